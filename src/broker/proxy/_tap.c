/*
 * broker.proxy._tap: the compiled Tap of a relayed kernel WebSocket.
 *
 * broker/proxy/tap.py explains what a Tap is and why this exists; PyTap
 * there is the reference this file must match bit for bit (state, tallies,
 * answer flags), and tests/proxy/test_tap.py checks that it does. Besides
 * PyTap's interface, a Tap relays the common chunk itself: from_client and
 * from_upstream are installed as the transports' data_received; a chunk that
 * is exactly one whole text or binary frame (0x81/0x82, 7- or 16-bit length),
 * arriving between frames, is written on, peeked and tallied here. Anything
 * else goes, untouched and before anything is written, to the relay's Python
 * method for that direction, which runs the full scanner.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* memmem */
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define PEEK 512 /* payload bytes peeked at the start of a frame (relay.PEEK) */
#define TAIL 64  /* and at its end */
#define MAX_OWED 64

enum { EXEC_START = 1, EXEC_END = 2, ACTIVITY = 4, MID_REPLY = 8 };
enum { SHELL, IOPUB, STDIN, CONTROL, OTHER, NCHANNELS };
enum { TO_KERNEL, TO_CLIENT };
enum { OP_CONT = 0, OP_TEXT = 1, OP_BINARY = 2 };
enum {
    WRITE_UPSTREAM, WRITE_CLIENT, SLOW_CLIENT, SLOW_UPSTREAM, ON_EVENT, QUICKACK, LIMITER,
    ON_DELAY, NCALLBACKS
};

typedef struct {
    PyObject_HEAD
    char ended, client_active, upstream_active, slow_client, slow_upstream, mid_reply;
    char busy, ticking, dirty;
    int owed, owed_idle;
    Py_ssize_t max_client, max_kernel;
    long long counts[2][NCHANNELS][2]; /* [direction][channel] -> messages, bytes */
    /* Set by wire(), in its argument order: where chunks go, who hears about frames. */
    PyObject *cb[NCALLBACKS];
} Tap;

/* -- byte searches over at most PEEK bytes ------------------------------------- */

static Py_ssize_t
find(const unsigned char *s, Py_ssize_t n, const char *needle, Py_ssize_t m, Py_ssize_t from)
{
    if (from < 0)
        from = 0;
    if (from + m > n)
        return -1;
#if defined(__GLIBC__) || defined(__APPLE__) || defined(__FreeBSD__)
    /* libc's memmem: vectorised, and this runs several times per frame. */
    const unsigned char *hit = memmem(s + from, (size_t)(n - from), needle, (size_t)m);
    return hit ? hit - s : -1;
#else
    for (Py_ssize_t i = from; i + m <= n; i++) {
        if (s[i] == (unsigned char)needle[0] && memcmp(s + i, needle, (size_t)m) == 0)
            return i;
    }
    return -1;
#endif
}

static Py_ssize_t
rfind(const unsigned char *s, Py_ssize_t n, const char *needle, Py_ssize_t m)
{
    for (Py_ssize_t i = n - m; i >= 0; i--) {
        if (s[i] == (unsigned char)needle[0] && memcmp(s + i, needle, (size_t)m) == 0)
            return i;
    }
    return -1;
}

#define CONTAINS(s, n, lit) (find((s), (n), (lit), (Py_ssize_t)sizeof(lit) - 1, 0) >= 0)
#define EQUALS(s, n, lit) ((n) == (Py_ssize_t)sizeof(lit) - 1 && memcmp((s), (lit), (n)) == 0)

static int
channel_named(const unsigned char *s, Py_ssize_t n)
{
    if (EQUALS(s, n, "shell"))
        return SHELL;
    if (EQUALS(s, n, "iopub"))
        return IOPUB;
    if (EQUALS(s, n, "stdin"))
        return STDIN;
    if (EQUALS(s, n, "control"))
        return CONTROL;
    return OTHER;
}

static uint64_t
le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* tap.channel_of */
static int
channel_of(int opcode, const unsigned char *head, Py_ssize_t hn, const unsigned char *tail,
           Py_ssize_t tn)
{
    if (opcode == OP_BINARY) {
        if (hn >= 24) {
            uint64_t start = le64(head + 8), stop = le64(head + 16);
            if (stop <= (uint64_t)hn)
                return start <= stop ? channel_named(head + start, (Py_ssize_t)(stop - start))
                                     : OTHER;
        }
        return OTHER;
    }
    const unsigned char *text = tail;
    Py_ssize_t n = tn;
    Py_ssize_t at = n ? rfind(text, n, "\"channel\"", 9) : -1;
    if (at < 0) {
        text = head;
        n = hn;
        at = rfind(text, n, "\"channel\"", 9);
        if (at < 0)
            return OTHER;
    }
    Py_ssize_t quote = find(text, n, "\"", 1, at + 9);
    Py_ssize_t close = quote >= 0 ? find(text, n, "\"", 1, quote + 1) : -1;
    if (close > quote && quote >= 0)
        return channel_named(text + quote + 1, close - quote - 1);
    return OTHER;
}

/* tap.state_of: 1 with value and len set, or 0 for None. */
static int
state_of(const unsigned char *head, Py_ssize_t hn, const unsigned char *tail, Py_ssize_t tn,
         const unsigned char **value, Py_ssize_t *len)
{
    const unsigned char *texts[2] = {tail, head};
    Py_ssize_t sizes[2] = {tn, hn};
    for (int k = 0; k < 2; k++) {
        const unsigned char *text = texts[k];
        Py_ssize_t n = sizes[k];
        Py_ssize_t at = rfind(text, n, "\"execution_state\"", 17);
        if (at < 0)
            continue;
        Py_ssize_t vstart = at + 17, vend = at + 40 < n ? at + 40 : n;
        if (vstart > vend)
            vstart = vend;
        const unsigned char *v = text + vstart;
        Py_ssize_t vn = vend - vstart;
        Py_ssize_t quote = find(v, vn, "\"", 1, 0);
        Py_ssize_t close = quote >= 0 ? find(v, vn, "\"", 1, quote + 1) : -1;
        if (close > quote && quote >= 0) {
            *value = v + quote + 1;
            *len = close - quote - 1;
            return 1;
        }
        return 0;
    }
    return 0;
}

/* -- per-frame bookkeeping (PyTap.client_frame / kernel_frame) ---------------------- */

static int
activity(Tap *self)
{
    if (self->ticking) {
        self->dirty = 1;
        return 0;
    }
    return ACTIVITY;
}

static int
client_frame(Tap *self, int opcode, Py_ssize_t length, const unsigned char *head, Py_ssize_t hn,
             const unsigned char *tail, Py_ssize_t tn)
{
    if (opcode == OP_CONT) {
        self->counts[TO_KERNEL][OTHER][1] += length;
        return 0;
    }
    int channel = channel_of(opcode, head, hn, tail, tn);
    self->counts[TO_KERNEL][channel][0] += 1;
    self->counts[TO_KERNEL][channel][1] += length;
    int flags = 0;
    if (channel == SHELL || channel == CONTROL || opcode == OP_TEXT) {
        if (CONTAINS(head, hn, "_request\"") && self->owed < MAX_OWED) {
            self->owed += 1;
            self->owed_idle += 1;
        }
        if (CONTAINS(head, hn, "\"execute_request\""))
            flags = EXEC_START | activity(self);
    }
    return flags;
}

static int
kernel_frame(Tap *self, int opcode, Py_ssize_t length, const unsigned char *head, Py_ssize_t hn,
             const unsigned char *tail, Py_ssize_t tn)
{
    int flags = 0;
    if (opcode == OP_CONT) {
        self->counts[TO_CLIENT][OTHER][1] += length;
    }
    else {
        int channel = channel_of(opcode, head, hn, tail, tn);
        self->counts[TO_CLIENT][channel][0] += 1;
        self->counts[TO_CLIENT][channel][1] += length;
        if (channel == IOPUB) {
            const unsigned char *state;
            Py_ssize_t sn;
            if (state_of(head, hn, tail, tn, &state, &sn)) {
                self->busy = EQUALS(state, sn, "busy");
                if (EQUALS(state, sn, "idle")) {
                    if (self->owed_idle)
                        self->owed_idle -= 1;
                }
                else if (EQUALS(state, sn, "starting") || EQUALS(state, sn, "restarting") ||
                         EQUALS(state, sn, "dead")) {
                    self->owed = self->owed_idle = 0;
                }
            }
        }
        else if ((channel == SHELL || channel == CONTROL) && CONTAINS(head, hn, "_reply\"")) {
            if (self->owed)
                self->owed -= 1;
            if (channel == SHELL && CONTAINS(head, hn, "\"execute_reply\""))
                flags = EXEC_END;
        }
        flags |= activity(self);
    }
    if (self->busy || self->owed || self->owed_idle)
        flags |= MID_REPLY;
    return flags;
}

/* -- Python-visible methods -------------------------------------------------------- */

static int
parse_frame_args(PyObject *const *args, Py_ssize_t nargs, int *opcode, Py_ssize_t *length,
                 Py_buffer *head, Py_buffer *tail)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "expected (opcode, length, head, tail)");
        return -1;
    }
    *opcode = (int)PyLong_AsLong(args[0]);
    if (*opcode == -1 && PyErr_Occurred())
        return -1;
    *length = PyLong_AsSsize_t(args[1]);
    if (*length == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[2], head, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(args[3], tail, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(head);
        return -1;
    }
    return 0;
}

typedef int (*frame_fn)(Tap *, int, Py_ssize_t, const unsigned char *, Py_ssize_t,
                        const unsigned char *, Py_ssize_t);

static PyObject *
apply_frame(Tap *self, PyObject *const *args, Py_ssize_t nargs, frame_fn fn)
{
    int opcode;
    Py_ssize_t length;
    Py_buffer head, tail;
    if (parse_frame_args(args, nargs, &opcode, &length, &head, &tail) < 0)
        return NULL;
    int flags = fn(self, opcode, length, head.buf, head.len, tail.buf, tail.len);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return PyLong_FromLong(flags);
}

static PyObject *
Tap_client_frame(Tap *self, PyObject *const *args, Py_ssize_t nargs)
{
    return apply_frame(self, args, nargs, client_frame);
}

static PyObject *
Tap_kernel_frame(Tap *self, PyObject *const *args, Py_ssize_t nargs)
{
    return apply_frame(self, args, nargs, kernel_frame);
}

static PyObject *
Tap_add(Tap *self, PyObject *args)
{
    int direction, channel;
    long long size, messages = 1;
    if (!PyArg_ParseTuple(args, "iiL|L", &direction, &channel, &size, &messages))
        return NULL;
    if (direction < 0 || direction > 1 || channel < 0 || channel >= NCHANNELS) {
        PyErr_SetString(PyExc_IndexError, "no such direction or channel");
        return NULL;
    }
    self->counts[direction][channel][0] += messages;
    self->counts[direction][channel][1] += size;
    Py_RETURN_NONE;
}

static PyObject *
Tap_take_counts(Tap *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *taken = PyList_New(0);
    if (taken == NULL)
        return NULL;
    for (int d = 0; d < 2; d++) {
        for (int c = 0; c < NCHANNELS; c++) {
            long long *entry = self->counts[d][c];
            if (!entry[0] && !entry[1])
                continue;
            PyObject *item = Py_BuildValue("(iiLL)", d, c, entry[0], entry[1]);
            if (item == NULL || PyList_Append(taken, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(taken);
                return NULL;
            }
            Py_DECREF(item);
            entry[0] = entry[1] = 0;
        }
    }
    return taken;
}

static int
Tap_clear(Tap *self)
{
    for (int i = 0; i < NCALLBACKS; i++)
        Py_CLEAR(self->cb[i]);
    return 0;
}

static int
Tap_traverse(Tap *self, visitproc visit, void *arg)
{
    for (int i = 0; i < NCALLBACKS; i++)
        Py_VISIT(self->cb[i]);
    return 0;
}

static void
Tap_dealloc(Tap *self)
{
    PyObject_GC_UnTrack(self);
    Tap_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Tap_wire(Tap *self, PyObject *args)
{
    PyObject *given[NCALLBACKS];
    Py_ssize_t max_client, max_kernel;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnn:wire", &given[0], &given[1], &given[2], &given[3],
                          &given[4], &given[5], &given[6], &given[7], &max_client, &max_kernel))
        return NULL;
    Tap_clear(self);
    for (int i = 0; i < NCALLBACKS; i++) /* None: not there (no quick ACKs, no limiter) */
        self->cb[i] = given[i] == Py_None ? NULL : Py_NewRef(given[i]);
    self->max_client = max_client;
    self->max_kernel = max_kernel;
    Py_RETURN_NONE;
}

static PyObject *
Tap_unwire(Tap *self, PyObject *Py_UNUSED(ignored))
{
    Tap_clear(self);
    Py_RETURN_NONE;
}

/* Calls fn(arg) (or fn() when arg is NULL) and drops the result; -1 on error. fn is
   held for the call: the call may end the relay, which unwires (and releases) it. */
static int
call_drop(PyObject *fn, PyObject *arg)
{
    Py_INCREF(fn);
    PyObject *r = arg ? PyObject_CallOneArg(fn, arg) : PyObject_CallNoArgs(fn);
    Py_DECREF(fn);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Tells the hooks about a frame that needs Python (on_event(flags)); -1 on error. */
static int
notify(Tap *self, int flags)
{
    PyObject *fn = self->cb[ON_EVENT];
    if (fn == NULL)
        return 0;
    PyObject *arg = PyLong_FromLong(flags);
    int rc = arg ? call_drop(fn, arg) : -1;
    Py_XDECREF(arg);
    return rc;
}

/* Hands a chunk to the relay's Python method for that direction. */
static PyObject *
slow(PyObject *cb, PyObject *data)
{
    if (cb == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Tap is not wired to a relay");
        return NULL;
    }
    Py_INCREF(cb); /* the relay may end during the call, which unwires it */
    PyObject *r = PyObject_CallOneArg(cb, data);
    Py_DECREF(cb);
    return r;
}

/* The length of a whole single frame that is all of data, or -1 (with *at at its payload). */
static Py_ssize_t
whole_frame(const unsigned char *p, Py_ssize_t n, int masked, Py_ssize_t *at)
{
    if (n < 2 || (p[0] != 0x81 && p[0] != 0x82) || ((p[1] & 0x80) != 0) != masked)
        return -1;
    Py_ssize_t length = p[1] & 0x7F, pos = 2;
    if (length == 127)
        return -1;
    if (length == 126) {
        if (n < 4)
            return -1;
        length = (p[2] << 8) | p[3];
        pos = 4;
    }
    if (masked)
        pos += 4;
    if (pos + length != n)
        return -1;
    *at = pos;
    return length;
}

/* The payload length when the fast path may take data (one whole frame, between
   frames, within the size cap; *at is where the payload starts), else -1. */
static Py_ssize_t
fast_frame(Tap *self, PyObject *data, int from_client, Py_ssize_t *at)
{
    if ((from_client ? self->slow_client : self->slow_upstream) || !PyBytes_CheckExact(data) ||
        self->cb[from_client ? WRITE_UPSTREAM : WRITE_CLIENT] == NULL)
        return -1;
    Py_ssize_t length = whole_frame((const unsigned char *)PyBytes_AS_STRING(data),
                                    PyBytes_GET_SIZE(data), from_client, at);
    return length <= (from_client ? self->max_client : self->max_kernel) ? length : -1;
}

static PyObject *
Tap_from_client(Tap *self, PyObject *data)
{
    if (self->ended)
        Py_RETURN_NONE;
    Py_ssize_t at, length = fast_frame(self, data, 1, &at);
    if (length < 0)
        return slow(self->cb[SLOW_CLIENT], data);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    self->client_active = 1;
    if (call_drop(self->cb[WRITE_UPSTREAM], data) < 0)
        return NULL;
    /* The frame is written as it came; only the peeked bytes are unmasked. */
    const unsigned char *mask = p + at - 4;
    unsigned char head[PEEK], tail[TAIL];
    Py_ssize_t hn = length < PEEK ? length : PEEK, tn = 0;
    for (Py_ssize_t i = 0; i < hn; i++)
        head[i] = p[at + i] ^ mask[i & 3];
    if (length > PEEK && !CONTAINS(head, hn, "\"channel\"")) {
        Py_ssize_t off = length - TAIL;
        tn = TAIL;
        for (Py_ssize_t i = 0; i < TAIL; i++)
            tail[i] = p[at + off + i] ^ mask[(off + i) & 3];
    }
    int flags = client_frame(self, p[0] & 0x0F, length, head, hn, tail, tn);
    if (flags && notify(self, flags) < 0)
        return NULL;
    PyObject *fn = self->cb[LIMITER];
    if (fn != NULL && !self->ended) {
        Py_INCREF(fn);
        PyObject *args[2] = {PyLong_FromSsize_t(length), PyFloat_FromDouble(1.0)};
        PyObject *r = (args[0] && args[1]) ? PyObject_Vectorcall(fn, args, 2, NULL) : NULL;
        Py_XDECREF(args[0]);
        Py_XDECREF(args[1]);
        Py_DECREF(fn);
        if (r == NULL)
            return NULL;
        double delay = PyFloat_AsDouble(r);
        if (delay == -1.0 && PyErr_Occurred()) {
            Py_DECREF(r);
            return NULL;
        }
        int rc = 0;
        if (delay != 0.0 && self->cb[ON_DELAY] != NULL)
            rc = call_drop(self->cb[ON_DELAY], r);
        Py_DECREF(r);
        if (rc < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Tap_from_upstream(Tap *self, PyObject *data)
{
    if (self->ended)
        Py_RETURN_NONE;
    Py_ssize_t at, length = fast_frame(self, data, 0, &at);
    if (length < 0)
        return slow(self->cb[SLOW_UPSTREAM], data);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    self->upstream_active = 1;
    if (call_drop(self->cb[WRITE_CLIENT], data) < 0)
        return NULL;
    Py_ssize_t hn = length < PEEK ? length : PEEK;
    Py_ssize_t tn = length > PEEK ? TAIL : 0;
    int flags = kernel_frame(self, p[0] & 0x0F, length, p + at, hn, p + n - tn, tn);
    if ((flags & (EXEC_START | EXEC_END | ACTIVITY)) && notify(self, flags) < 0)
        return NULL;
    self->mid_reply = (flags & MID_REPLY) != 0;
    PyObject *fn = self->cb[QUICKACK];
    if (self->mid_reply && fn != NULL && !self->ended && call_drop(fn, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Tap_methods[] = {
    {"client_frame", (PyCFunction)(void (*)(void))Tap_client_frame, METH_FASTCALL,
     "client_frame(opcode, length, head, tail) -> flags: a client data frame started."},
    {"kernel_frame", (PyCFunction)(void (*)(void))Tap_kernel_frame, METH_FASTCALL,
     "kernel_frame(opcode, length, head, tail) -> flags: a kernel data frame started."},
    {"add", (PyCFunction)Tap_add, METH_VARARGS,
     "add(direction, channel, size, messages=1): tally a message or more bytes of one."},
    {"take_counts", (PyCFunction)Tap_take_counts, METH_NOARGS,
     "The non-zero tallies as (direction, channel, messages, bytes), reset to zero."},
    {"wire", (PyCFunction)Tap_wire, METH_VARARGS,
     "wire(write_upstream, write_client, slow_from_client, slow_from_upstream, on_event, "
     "quickack, limiter, on_delay, max_client, max_kernel): relay chunks from now on."},
    {"unwire", (PyCFunction)Tap_unwire, METH_NOARGS,
     "Drop every callable wire() gave (the relay ended)."},
    {"from_client", (PyCFunction)Tap_from_client, METH_O,
     "A chunk from the client (a transport's data_received)."},
    {"from_upstream", (PyCFunction)Tap_from_upstream, METH_O,
     "A chunk from the upstream (a transport's data_received)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Tap_members[] = {
    {"ended", T_BOOL, offsetof(Tap, ended), 0, NULL},
    {"client_active", T_BOOL, offsetof(Tap, client_active), 0, NULL},
    {"upstream_active", T_BOOL, offsetof(Tap, upstream_active), 0, NULL},
    {"slow_client", T_BOOL, offsetof(Tap, slow_client), 0, NULL},
    {"slow_upstream", T_BOOL, offsetof(Tap, slow_upstream), 0, NULL},
    {"mid_reply", T_BOOL, offsetof(Tap, mid_reply), 0, NULL},
    {"busy", T_BOOL, offsetof(Tap, busy), 0, NULL},
    {"ticking", T_BOOL, offsetof(Tap, ticking), 0, NULL},
    {"dirty", T_BOOL, offsetof(Tap, dirty), 0, NULL},
    {"owed", T_INT, offsetof(Tap, owed), 0, NULL},
    {"owed_idle", T_INT, offsetof(Tap, owed_idle), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.proxy._tap.Tap",
    .tp_basicsize = sizeof(Tap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Per-frame bookkeeping of a relayed kernel WebSocket, with its fast path "
              "(see broker/proxy/tap.py).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Tap_dealloc,
    .tp_traverse = (traverseproc)Tap_traverse,
    .tp_clear = (inquiry)Tap_clear,
    .tp_methods = Tap_methods,
    .tp_members = Tap_members,
};

/* The peeks on their own, so tests can compare them with tap.channel_of / state_of. */
static PyObject *
mod_channel_of(PyObject *Py_UNUSED(module), PyObject *args)
{
    int opcode;
    Py_buffer head, tail;
    if (!PyArg_ParseTuple(args, "iy*y*", &opcode, &head, &tail))
        return NULL;
    int channel = channel_of(opcode, head.buf, head.len, tail.buf, tail.len);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return PyLong_FromLong(channel);
}

static PyObject *
mod_state_of(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer head, tail;
    if (!PyArg_ParseTuple(args, "y*y*", &head, &tail))
        return NULL;
    const unsigned char *value;
    Py_ssize_t n;
    PyObject *result;
    if (state_of(head.buf, head.len, tail.buf, tail.len, &value, &n))
        result = PyBytes_FromStringAndSize((const char *)value, n);
    else
        result = Py_NewRef(Py_None);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

static PyMethodDef module_methods[] = {
    {"channel_of", mod_channel_of, METH_VARARGS, "channel_of(opcode, head, tail) -> index"},
    {"state_of", mod_state_of, METH_VARARGS, "state_of(head, tail) -> bytes or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef tapmodule = {
    PyModuleDef_HEAD_INIT, "broker.proxy._tap",
    "The compiled Tap of a relayed kernel WebSocket (see broker/proxy/tap.py).", -1,
    module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tap(void)
{
    if (PyType_Ready(&TapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&tapmodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TapType);
    if (PyModule_AddObject(m, "Tap", (PyObject *)&TapType) < 0) {
        Py_DECREF(&TapType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
