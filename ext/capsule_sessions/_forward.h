/* A method of Session that forwards to the same-named method of its frame ring at the
 * cost of one C call.
 *
 * Session's visual-input methods are ordinary class attributes (so subclass overrides,
 * mock.patch.object on the class or an instance, help() and inspect.signature() work),
 * but a Python method that forwards costs more than the store it forwards (W6). This
 * descriptor is a method descriptor with vectorcall: `session.store_frame(...)` calls
 * it with the session first; it swaps in the ring (read from Session's `_ring` slot)
 * and calls the ring's method with the caller's arguments untouched.
 *
 * A TypeError is handed to `refit(reference, session, args, kwargs)`, which raises the
 * TypeError CPython gives for Session's own Python method when the arguments do not
 * fit its signature, so a wrong call reads the same on both backends; otherwise the
 * ring's error stands. On the class, the descriptor gives the Python method itself.
 */
#ifndef CAPSULE_FORWARD_H
#define CAPSULE_FORWARD_H

#include <Python.h>
#include <structmember.h>

/* More arguments than this take the Python method (no call of this API has that many). */
#define CAPSULE_FORWARD_MAX_ARGS 15

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *reference;     /* Session's Python method: signature, docs, slow path */
    PyObject *name;          /* the ring's method of the same name */
    PyObject *refit;
    PyTypeObject *owner;     /* Session */
    Py_ssize_t ring_offset;  /* where Session's `_ring` slot lives in an instance */
} capsule_RingForward;

static PyObject *capsule_forward_refit(capsule_RingForward *self, PyObject *const *args,
                                       Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *type, *value, *traceback, *positional = NULL, *keywords = NULL, *outcome = NULL;
    Py_ssize_t i, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyErr_Fetch(&type, &value, &traceback);
    positional = PyTuple_New(nargs - 1);
    keywords = PyDict_New();
    if (positional == NULL || keywords == NULL)
        goto done;
    for (i = 1; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(positional, i - 1, args[i]);
    }
    for (i = 0; i < nkw; i++) {
        if (PyDict_SetItem(keywords, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0)
            goto done;
    }
    outcome = PyObject_CallFunctionObjArgs(self->refit, self->reference, args[0], positional, keywords, NULL);
done:
    Py_XDECREF(positional);
    Py_XDECREF(keywords);
    if (outcome == NULL) {  /* refit raised the reference's error (or failed): that one */
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return NULL;
    }
    Py_DECREF(outcome);
    PyErr_Restore(type, value, traceback);  /* the arguments fit: the ring's error stands */
    return NULL;
}

static PyObject *capsule_forward_vectorcall(PyObject *callable, PyObject *const *args,
                                            size_t nargsf, PyObject *kwnames)
{
    capsule_RingForward *self = (capsule_RingForward *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *stack[CAPSULE_FORWARD_MAX_ARGS + 1];
    PyObject *ring, *method, *result;

    if (nargs < 1 || nargs + nkw > CAPSULE_FORWARD_MAX_ARGS || !PyObject_TypeCheck(args[0], self->owner))
        return PyObject_Vectorcall(self->reference, args, nargsf, kwnames);
    ring = *(PyObject **)((char *)args[0] + self->ring_offset);
    method = ring == NULL ? NULL : _PyType_Lookup(Py_TYPE(ring), self->name);
    if (method == NULL)
        return PyObject_Vectorcall(self->reference, args, nargsf, kwnames);
    Py_INCREF(ring);
    Py_INCREF(method);
    /* stack[0] stays free, so the callee may use it (PY_VECTORCALL_ARGUMENTS_OFFSET). */
    stack[1] = ring;
    memcpy(stack + 2, args + 1, (size_t)(nargs - 1 + nkw) * sizeof(PyObject *));
    result = PyObject_Vectorcall(method, stack + 1, (size_t)nargs | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
    Py_DECREF(method);
    Py_DECREF(ring);
    if (result == NULL && PyErr_ExceptionMatches(PyExc_TypeError))
        return capsule_forward_refit(self, args, nargs, kwnames);
    return result;
}

static PyObject *capsule_forward_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(((capsule_RingForward *)self)->reference);
        return ((capsule_RingForward *)self)->reference;
    }
    return PyMethod_New(self, obj);
}

static PyObject *capsule_forward_getattro(PyObject *self, PyObject *name)
{
    /* __doc__, __name__, __wrapped__ ... are the Python method's. */
    PyObject *found = PyObject_GenericGetAttr(self, name);
    if (found != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return found;
    PyErr_Clear();
    return PyObject_GetAttr(((capsule_RingForward *)self)->reference, name);
}

static void capsule_forward_dealloc(PyObject *self)
{
    capsule_RingForward *f = (capsule_RingForward *)self;
    Py_XDECREF(f->reference);
    Py_XDECREF(f->name);
    Py_XDECREF(f->refit);
    Py_XDECREF((PyObject *)f->owner);
    Py_TYPE(self)->tp_free(self);
}

static PyTypeObject capsule_RingForward_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "capsule_sessions._framebuf.RingForward",
    .tp_basicsize = sizeof(capsule_RingForward),
    .tp_dealloc = capsule_forward_dealloc,
    .tp_vectorcall_offset = offsetof(capsule_RingForward, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = capsule_forward_getattro,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_descr_get = capsule_forward_get,
};

/* A forwarder for `name`; NULL with an exception set when ring_slot is not Session's
 * `_ring` member (a __slots__ entry). */
static PyObject *capsule_forward_new(PyObject *reference, PyObject *name, PyObject *refit,
                                     PyObject *owner, PyObject *ring_slot)
{
    capsule_RingForward *f;
    if (!PyType_Check(owner) || !Py_IS_TYPE(ring_slot, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)ring_slot)->d_member->type != T_OBJECT_EX) {
        PyErr_SetString(PyExc_TypeError, "RingForward needs a class and its `_ring` slot");
        return NULL;
    }
    if (capsule_RingForward_Type.tp_flags & Py_TPFLAGS_READY) {
        ;
    } else if (PyType_Ready(&capsule_RingForward_Type) < 0) {
        return NULL;
    }
    f = PyObject_New(capsule_RingForward, &capsule_RingForward_Type);
    if (f == NULL)
        return NULL;
    f->vectorcall = capsule_forward_vectorcall;
    Py_INCREF(reference);
    f->reference = reference;
    Py_INCREF(name);
    f->name = name;
    Py_INCREF(refit);
    f->refit = refit;
    Py_INCREF(owner);
    f->owner = (PyTypeObject *)owner;
    f->ring_offset = ((PyMemberDescrObject *)ring_slot)->d_member->offset;
    return (PyObject *)f;
}

#endif
