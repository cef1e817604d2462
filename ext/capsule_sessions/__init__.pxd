# Marks ext/capsule_sessions as the source tree of the capsule_sessions package, so
# Cython finds _framebuf.pxd as the declarations of capsule_sessions._framebuf.
