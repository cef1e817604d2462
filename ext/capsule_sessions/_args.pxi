# Argument parsing: C fast paths for the common exact types; everything else goes to
# _validate, so messages and edge cases are the pure twin's by construction.


cdef inline int parse_instant(object value, str name, double *seconds, int64_t *ns) except -1:
    cdef double x
    if PyFloat_CheckExact(value):
        x = PyFloat_AS_DOUBLE(value)
        if isfinite(x) and fabs(x) < MAX_INSTANT_SECONDS:
            seconds[0] = x
            ns[0] = <int64_t>(x * 1e9)
            return 0
    s, n = _validate.instant(value, name)
    seconds[0] = s
    ns[0] = n
    return 0


cdef inline int64_t parse_duration_ns(object value, str name) except? -1:
    cdef double x, scaled
    if PyFloat_CheckExact(value):
        x = PyFloat_AS_DOUBLE(value)
        if not isnan(x):
            scaled = x * 1e9
            if scaled >= 9.223372036854775e18:
                return INT64_MAX
            if scaled <= -9.223372036854775e18:
                return -INT64_MAX
            return <int64_t>scaled
    return _validate.duration_ns(value, name)


cdef inline Py_ssize_t parse_count(object value, str name) except -1:
    cdef int overflow = 0
    cdef long long n
    if PyLong_CheckExact(value):
        n = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow > 0:
            return MAX_COUNT
        if overflow < 0 or n <= 0:
            return 1
        return MAX_COUNT if n > MAX_COUNT else <Py_ssize_t>n
    return _validate.count(value, name)


cdef inline int64_t parse_int(object value, str name, int64_t low, int64_t high) except? -1:
    cdef int overflow = 0
    cdef long long n
    if PyLong_CheckExact(value):
        n = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and low <= n <= high:
            return n
    return _validate.integer(value, name, low, high)


cdef inline str parse_text(object value, str name):
    if PyUnicode_CheckExact(value):
        return <str>value
    return _validate.text(value, name)



cdef inline str parse_frame_fields(Slot *meta, object mime_type, object width, object height,
                                   object timestamp_ms, object frame_seq):
    """The described fields of a frame, into meta (the exact str of mime_type is returned
    for the caller to keep alive)."""
    mime_type = parse_text(mime_type, "mime_type")
    meta.width = parse_int(width, "width", 0, INT32_MAX)
    meta.height = parse_int(height, "height", 0, INT32_MAX)
    meta.timestamp_ms = parse_int(timestamp_ms, "timestamp_ms", -INT64_MAX - 1, INT64_MAX)
    meta.frame_seq = parse_int(frame_seq, "frame_seq", -INT64_MAX - 1, INT64_MAX)
    return mime_type


cdef inline void describe_image(Slot *meta, object data) noexcept:
    """An image array describes itself when width or height is 0: height, width =
    shape[:2] (after every field was checked: this raises nothing)."""
    if (meta.width == 0 or meta.height == 0) and cnp.PyArray_Check(data) and cnp.PyArray_NDIM(<cnp.ndarray>data) >= 2:
        if meta.height == 0:
            meta.height = min(cnp.PyArray_DIM(<cnp.ndarray>data, 0), INT32_MAX)
        if meta.width == 0:
            meta.width = min(cnp.PyArray_DIM(<cnp.ndarray>data, 1), INT32_MAX)
