# Deferred releases. Under a lock nothing may run Python code, and releasing a frame or
# a view can (a finalizer, a weakref callback); so references are collected in a Grave
# while locked and released once unlocked.


cdef inline void grave_init(Grave *g) noexcept nogil:
    g.items = g.inline_items
    g.n = 0
    g.cap = GRAVE_INLINE


cdef void grave_add(Grave *g, PyObject *o) noexcept nogil:
    """Take over a strong reference, to be released by grave_flush (after unlocking)."""
    cdef PyObject **grown
    cdef Py_ssize_t newcap
    if o == NULL:
        return
    if g.n == g.cap:
        newcap = g.cap * 2
        if g.items == g.inline_items:
            grown = <PyObject **>malloc(newcap * sizeof(PyObject *))
            if grown != NULL:
                memcpy(grown, g.items, g.n * sizeof(PyObject *))
        else:
            grown = <PyObject **>realloc(g.items, newcap * sizeof(PyObject *))
        if grown == NULL:
            # Out of memory: keeping the reference (a leak) is the only safe choice here.
            return
        g.items = grown
        g.cap = newcap
    g.items[g.n] = o
    g.n += 1


cdef void grave_flush(Grave *g) noexcept:
    """Release everything collected. Needs the GIL; no lock may be held."""
    cdef Py_ssize_t i
    for i in range(g.n):
        Py_DECREF(<object>g.items[i])
    if g.items != g.inline_items:
        free(g.items)
    grave_init(g)

