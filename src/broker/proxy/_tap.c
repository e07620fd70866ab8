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
#ifdef __linux__
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#define HAVE_ENGINE 1
#else
#define HAVE_ENGINE 0
#endif

#define PEEK 512 /* payload bytes peeked at the start of a frame (relay.PEEK) */
#define TAIL 64  /* and at its end */
#define MAX_OWED 64

enum { EXEC_START = 1, EXEC_END = 2, ACTIVITY = 4, MID_REPLY = 8 };
enum { SHELL, IOPUB, STDIN, CONTROL, OTHER, NCHANNELS };
enum { TO_KERNEL, TO_CLIENT };
enum { OP_CONT = 0, OP_TEXT = 1, OP_BINARY = 2 };
enum {
    WRITE_UPSTREAM, WRITE_CLIENT, SLOW_CLIENT, SLOW_UPSTREAM, ON_EVENT, QUICKACK, LIMITER,
    ON_DELAY, NWIRED, /* the callbacks wire() sets; engage() sets the next one */
    ON_PENDING = NWIRED, NCALLBACKS
};
/* Who reads a relayed connection's sockets: the event loop, or the engine thread. */
enum { OWNER_LOOP, OWNER_ENGINE };
/* Whether the engine handed the connection back to the loop (see engine_chunk). */
enum { BACK_NONE, BACK_HANDED, BACK_END };

typedef struct Tap {
    PyObject_HEAD
    char ended, client_active, upstream_active, slow_client, slow_upstream, mid_reply;
    char busy, ticking, dirty;
    int owed, owed_idle;
    Py_ssize_t max_client, max_kernel;
    long long counts[2][NCHANNELS][2]; /* [direction][channel] -> messages, bytes */
    /* Set by wire(), in its argument order: where chunks go, who hears about frames. */
    PyObject *cb[NCALLBACKS];
    /* The engine (all under engine_lock): the sockets, who reads them, what waits for
       the loop. */
    int fds[2]; /* client, upstream; -1 until engage() */
    char owner, engaged, queued, quickack_fd;
    /* A data frame the engine is in the middle of, per leg (rem: payload bytes to come). */
    long long rem[2], rem_off[2];
    int rem_op[2];
    unsigned char rem_mask[2][4];
    /* The client's rate limit while the engine relays (a copy of the Python limiter's
       buckets, handed back with the connection): on, rates and bursts, the buckets and
       when they were last charged, whether a charge succeeded (ends a throttled spell). */
    char lim, lim_ok;
    double lim_mrate, lim_mburst, lim_brate, lim_bburst, lim_msgs, lim_bytes, lim_last;
    /* Bytes the engine relayed that fds[i] did not take yet (it waits for EPOLLOUT, and
       reads nothing more from the other socket meanwhile). */
    char *out[2];
    Py_ssize_t out_len[2], out_pos[2];
    /* Queued for the loop: executions, activity, a hand-back with a chunk from p_leg the
       engine did not relay. */
    int p_exec_start, p_exec_end, p_activity, p_back, p_leg;
    char *p_chunk;
    Py_ssize_t p_chunk_len;
    struct Tap *next_ready;
} Tap;

#if HAVE_ENGINE
/* Guards what the engine thread and the loop share (see "the engine" below). */
static pthread_mutex_t engine_lock = PTHREAD_MUTEX_INITIALIZER;
#define ENGINE_LOCK() pthread_mutex_lock(&engine_lock)
#define ENGINE_UNLOCK() pthread_mutex_unlock(&engine_lock)
#else
#define ENGINE_LOCK() ((void)0)
#define ENGINE_UNLOCK() ((void)0)
#endif

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
    /* An activity the engine queued counts as ticking: the loop starts the timer. */
    if (self->ticking || self->p_activity) {
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
Tap_take_counts(Tap *self, PyObject *Py_UNUSED(ignored))
{
    long long counts[2][NCHANNELS][2];
    ENGINE_LOCK(); /* the engine may be adding to them */
    memcpy(counts, self->counts, sizeof counts);
    memset(self->counts, 0, sizeof self->counts);
    ENGINE_UNLOCK();
    PyObject *taken = PyList_New(0);
    if (taken == NULL)
        return NULL;
    for (int d = 0; d < 2; d++) {
        for (int c = 0; c < NCHANNELS; c++) {
            long long *entry = counts[d][c];
            if (!entry[0] && !entry[1])
                continue;
            PyObject *item = Py_BuildValue("(iiLL)", d, c, entry[0], entry[1]);
            if (item == NULL || PyList_Append(taken, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(taken);
                return NULL;
            }
            Py_DECREF(item);
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

static int
Tap_init(Tap *self, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Tap() takes no arguments");
        return -1;
    }
    self->fds[0] = self->fds[1] = -1;
    return 0;
}

static void
Tap_dealloc(Tap *self)
{
    PyObject_GC_UnTrack(self);
    free(self->out[0]); /* never engaged here: the engine's table would hold a reference */
    free(self->out[1]);
    free(self->p_chunk);
    Tap_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Tap_wire(Tap *self, PyObject *args)
{
    PyObject *given[NWIRED];
    Py_ssize_t max_client, max_kernel;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnn:wire", &given[0], &given[1], &given[2], &given[3],
                          &given[4], &given[5], &given[6], &given[7], &max_client, &max_kernel))
        return NULL;
    for (int i = 0; i < NWIRED; i++)
        Py_CLEAR(self->cb[i]);
    for (int i = 0; i < NWIRED; i++) /* None: not there (no quick ACKs, no limiter) */
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

static uint64_t
be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Whether f (m bytes) starts with the whole header of an unfragmented text or binary
   frame, masked as this direction's are: then *length is its payload's and *at where
   that payload starts. */
static int
data_header(const unsigned char *f, Py_ssize_t m, int masked, uint64_t *length,
            Py_ssize_t *at)
{
    if (m < 2 || (f[0] != 0x81 && f[0] != 0x82) || ((f[1] & 0x80) != 0) != masked)
        return 0;
    uint64_t len = f[1] & 0x7F;
    Py_ssize_t pos = 2;
    if (len == 126) {
        if (m < 4)
            return 0;
        len = ((uint64_t)f[2] << 8) | f[3];
        pos = 4;
    }
    else if (len == 127) {
        if (m < 10)
            return 0;
        len = be64(f + 2);
        pos = 10;
    }
    if (masked)
        pos += 4;
    if (m < pos)
        return 0;
    *length = len;
    *at = pos;
    return 1;
}

/* FrameScanner's fast path: data is exactly one such frame, with a 7- or 16-bit
   length. Its payload length (*at where it starts), or -1. */
static Py_ssize_t
whole_frame(const unsigned char *p, Py_ssize_t n, int masked, Py_ssize_t *at)
{
    uint64_t length;
    if (!data_header(p, n, masked, &length, at) || (p[1] & 0x7F) == 127 ||
        (uint64_t)(n - *at) != length)
        return -1;
    return (Py_ssize_t)length;
}

/* client_frame() for a whole masked frame at p (payload at at): the frame is written on
   as it came; only the peeked bytes are unmasked, as FrameScanner's fast path does. */
static int
client_whole_frame(Tap *self, const unsigned char *p, Py_ssize_t at, Py_ssize_t length)
{
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
    return client_frame(self, p[0] & 0x0F, length, head, hn, tail, tn);
}

/* kernel_frame() for a whole unmasked frame of n bytes at p (payload at at). */
static int
kernel_whole_frame(Tap *self, const unsigned char *p, Py_ssize_t n, Py_ssize_t at,
                   Py_ssize_t length)
{
    Py_ssize_t hn = length < PEEK ? length : PEEK;
    Py_ssize_t tn = length > PEEK ? TAIL : 0;
    return kernel_frame(self, p[0] & 0x0F, length, p + at, hn, p + n - tn, tn);
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
    int flags = client_whole_frame(self, p, at, length);
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
    int flags = kernel_whole_frame(self, p, n, at, length);
    if ((flags & (EXEC_START | EXEC_END | ACTIVITY)) && notify(self, flags) < 0)
        return NULL;
    self->mid_reply = (flags & MID_REPLY) != 0;
    PyObject *fn = self->cb[QUICKACK];
    if (self->mid_reply && fn != NULL && !self->ended && call_drop(fn, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* -- the engine: a thread that relays connections between the loop's visits ------------
 *
 * Driving every chunk through the event loop costs a loop iteration, a callback and the
 * GIL per wakeup: on one connection that is as much as the relaying itself. The engine
 * is one thread with its own epoll that reads and writes engaged connections directly
 * while they carry unfragmented data frames (whole or spanning reads; the loop gives a
 * connection when its scanners are between frames, nothing of its own waits to be
 * written and reading is not paused). It never touches a Python object. It charges the
 * client's rate limit (a copy of the limiter's buckets) while the buckets hold; a
 * message that would be throttled goes to the loop's limiter. A peer that does
 * not take all it is sent gets the rest when it can (EPOLLOUT) while the other side is
 * not read. The moment a chunk holds anything else (a fragment, a control or close
 * frame, a frame over the size cap, the end of the stream), the engine hands the
 * connection back: it stops reading it and queues what the loop must do (process the
 * chunk, write what a peer did not take, continue the frame the engine is in, read the
 * end itself); the loop, woken through an eventfd, does it with the Python relay and
 * gives the connection back when the steady state returns. Activity and execution
 * timing are queued the same way. The loop takes a connection back (take()) before it
 * writes on it itself: heartbeats, closes.
 *
 * engine_lock guards every engaged Tap's engine fields, its tallies and reply-tracking
 * state, the fd table and the ready list; the engine holds it while it handles one
 * chunk, the loop while it gives, takes or drains.
 */
#if HAVE_ENGINE
static int engine_epfd = -1, engine_evfd = -1;
static Tap **engine_fds; /* fd -> engaged Tap owning it, or NULL */
static int engine_nfds;
static Tap *engine_ready; /* Taps with something for the loop */
static char engine_buf[256 * 1024]; /* the engine thread's read buffer */

static void
engine_signal(Tap *t)
{
    if (!t->queued) {
        t->queued = 1;
        t->next_ready = engine_ready;
        engine_ready = t;
        uint64_t one = 1;
        ssize_t w = write(engine_evfd, &one, sizeof one);
        (void)w; /* a full counter already wakes the loop */
    }
}

/* Stop reading t's sockets (the loop owns them from now on). Under the lock. */
static void
engine_release(Tap *t)
{
    for (int leg = 0; leg < 2; leg++) {
        epoll_ctl(engine_epfd, EPOLL_CTL_DEL, t->fds[leg], NULL);
        if (t->fds[leg] < engine_nfds && engine_fds[t->fds[leg]] == t)
            engine_fds[t->fds[leg]] = NULL;
    }
    t->owner = OWNER_LOOP;
}

static char *
copy_out(const char *data, Py_ssize_t len)
{
    char *copy = len > 0 ? malloc((size_t)len) : NULL;
    if (copy != NULL)
        memcpy(copy, data, (size_t)len);
    return copy;
}

/* Hand t back to the loop, with a chunk from leg to process (may be empty); kind
   BACK_END: a stream ended. What waits in the out buffers goes with it. Under the lock. */
static void
engine_back(Tap *t, int kind, int leg, const char *chunk, Py_ssize_t chunk_len)
{
    engine_release(t);
    t->p_back = kind;
    t->p_leg = leg;
    t->p_chunk = copy_out(chunk, chunk_len);
    t->p_chunk_len = t->p_chunk ? chunk_len : 0;
    if (t->p_chunk_len != chunk_len)
        t->p_back = BACK_END; /* no memory for it: end the connection rather than lose
                                 bytes in its middle */
    engine_signal(t);
}

/* What the engine waits for on each socket: reading, unless the other socket has bytes
   waiting (back-pressure); writing, while this one has. Under the lock. */
static int
engine_interest(Tap *t)
{
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {
            .events = (t->out[1 - i] ? 0 : EPOLLIN) | (t->out[i] ? EPOLLOUT : 0),
            .data.fd = t->fds[i],
        };
        if (epoll_ctl(engine_epfd, EPOLL_CTL_MOD, t->fds[i], &ev) < 0)
            return -1;
    }
    return 0;
}

/* Write what waits for fds[i]. Under the lock. */
static void
engine_flush(Tap *t, int i)
{
    while (t->out[i] != NULL) {
        ssize_t w = send(t->fds[i], t->out[i] + t->out_pos[i],
                         (size_t)(t->out_len[i] - t->out_pos[i]), MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return;
            engine_back(t, BACK_END, i, NULL, 0);
            return;
        }
        t->out_pos[i] += w;
        if (t->out_pos[i] == t->out_len[i]) {
            free(t->out[i]);
            t->out[i] = NULL;
            t->out_len[i] = t->out_pos[i] = 0;
        }
    }
    if (engine_interest(t) < 0)
        engine_back(t, BACK_HANDED, i, NULL, 0);
}

/* Peeks and bookkeeping for a data frame starting at f whose payload (length bytes)
   begins at at, of which avail bytes are in this chunk, exactly as the Python relay
   would do them: FrameScanner's fast path when the frame is the whole chunk (7- or
   16-bit length), else its general path. Returns client_frame's or kernel_frame's flags. */
static int
engine_frame(Tap *t, int leg, const unsigned char *f, Py_ssize_t at, Py_ssize_t length,
             Py_ssize_t avail, int whole_chunk)
{
    if (whole_chunk) /* the same call as from_client / from_upstream */
        return leg == 0 ? client_whole_frame(t, f, at, length)
                        : kernel_whole_frame(t, f, at + length, at, length);
    const unsigned char *mask = leg == 0 ? f + at - 4 : NULL;
    unsigned char head[PEEK], tail[TAIL];
    Py_ssize_t in_chunk = length < avail ? length : avail;
    Py_ssize_t hn = in_chunk < PEEK ? in_chunk : PEEK, tn = 0;
    Py_ssize_t tail_at = 0;
    if (length <= avail) { /* the frame ends here: its last (up to) 64 bytes */
        tn = length < TAIL ? length : TAIL;
        tail_at = length - tn;
    }
    for (Py_ssize_t i = 0; i < hn; i++)
        head[i] = mask ? f[at + i] ^ mask[i & 3] : f[at + i];
    for (Py_ssize_t i = 0; i < tn; i++)
        tail[i] = mask ? f[at + tail_at + i] ^ mask[(tail_at + i) & 3] : f[at + tail_at + i];
    int opcode = f[0] & 0x0F;
    return leg == 0 ? client_frame(t, opcode, length, head, hn, tail, tn)
                    : kernel_frame(t, opcode, length, head, hn, tail, tn);
}

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* WsLimiter.take(size, 1.0) when it would answer 0.0: charges the buckets and returns 1;
   else charges nothing and returns 0. Under the lock. */
static int
engine_charge(Tap *t, double size)
{
    double now = monotonic(), elapsed = now - t->lim_last;
    double msgs = t->lim_msgs + elapsed * t->lim_mrate;
    if (msgs > t->lim_mburst)
        msgs = t->lim_mburst;
    double bytes = t->lim_bytes + elapsed * t->lim_brate;
    if (bytes > t->lim_bburst)
        bytes = t->lim_bburst;
    msgs -= 1.0;
    bytes -= size;
    if (!(msgs >= 0.0 && bytes >= 0.0))
        return 0;
    t->lim_msgs = msgs;
    t->lim_bytes = bytes;
    t->lim_last = now;
    t->lim_ok = 1;
    return 1;
}

/* How many bytes at the start of p (n bytes from leg) the engine relays itself, doing
   their bookkeeping (what the loop must hear of is queued per frame; *flags gathers the
   frames' answers): the rest of a frame it is in the middle of, then whole unfragmented
   data frames, then the start of one that continues in later reads. It stops before
   anything else (control frames, fragments, a frame over the size cap, a header cut in
   two), which the loop then gets. */
static Py_ssize_t
engine_walk(Tap *t, int leg, const unsigned char *p, Py_ssize_t n, int *flags)
{
    int masked = leg == 0;
    uint64_t max = (uint64_t)(leg == 0 ? t->max_client : t->max_kernel);
    Py_ssize_t pos = 0;
    int started = t->rem[leg] != 0;
    if (t->rem[leg]) {
        Py_ssize_t take = t->rem[leg] < n ? (Py_ssize_t)t->rem[leg] : n;
        t->rem[leg] -= take;
        t->rem_off[leg] += take;
        pos = take;
    }
    while (pos < n) {
        const unsigned char *f = p + pos;
        Py_ssize_t m = n - pos, at;
        uint64_t length;
        if (!data_header(f, m, masked, &length, &at) || length > max)
            break;
        if (leg == 0 && t->lim && !engine_charge(t, (double)length))
            break; /* it would be throttled: the loop's limiter decides how */
        Py_ssize_t avail = m - at;
        /* What whole_frame() accepts, from what is parsed already. */
        int whole_chunk = !started && pos == 0 && (f[1] & 0x7F) != 127 &&
                          (uint64_t)avail == length;
        int fl = engine_frame(t, leg, f, at, (Py_ssize_t)length, avail, whole_chunk);
        *flags |= fl;
        if (fl & EXEC_START) /* counted per frame: a read may hold several */
            t->p_exec_start++;
        if (fl & EXEC_END)
            t->p_exec_end++;
        if (fl & ACTIVITY)
            t->p_activity = 1;
        if (leg == 1)
            t->mid_reply = (fl & MID_REPLY) != 0;
        started = 1;
        if (length <= (uint64_t)avail) {
            pos += at + (Py_ssize_t)length;
        }
        else { /* continues in the next reads */
            t->rem[leg] = (long long)(length - (uint64_t)avail);
            t->rem_off[leg] = avail;
            t->rem_op[leg] = f[0] & 0x0F;
            if (masked)
                memcpy(t->rem_mask[leg], f + at - 4, 4);
            pos = n;
        }
    }
    return pos;
}

#define peer_i(leg) (1 - (leg))

/* One readable socket of an engaged connection. Under the lock. */
static void
engine_chunk(Tap *t, int leg)
{
    int fd = t->fds[leg], peer = t->fds[1 - leg];
    ssize_t n = read(fd, engine_buf, sizeof engine_buf);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) { /* the end, or an error: the loop's transport reads it again itself */
        engine_back(t, BACK_END, leg, NULL, 0);
        return;
    }
    if (leg == 0)
        t->client_active = 1;
    else
        t->upstream_active = 1;
    int flags = 0;
    Py_ssize_t handled = engine_walk(t, leg, (const unsigned char *)engine_buf, n, &flags);
    ssize_t w = 0;
    if (handled > 0) {
        w = send(peer, engine_buf, (size_t)handled, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                engine_back(t, BACK_END, 1 - leg, NULL, 0);
                return;
            }
            w = 0;
        }
    }
    if (leg == 1 && t->mid_reply && t->quickack_fd) { /* as Relay.from_upstream does */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    }
    if (w < handled) { /* the peer is full: keep the rest, stop reading this side */
        t->out[peer_i(leg)] = copy_out(engine_buf + w, handled - w);
        if (t->out[peer_i(leg)] == NULL) {
            engine_back(t, BACK_END, leg, NULL, 0);
            return;
        }
        t->out_len[peer_i(leg)] = handled - w;
        t->out_pos[peer_i(leg)] = 0;
    }
    if (handled < n) /* bytes only the loop handles */
        engine_back(t, BACK_HANDED, leg, engine_buf + handled, n - handled);
    else if (w < handled && engine_interest(t) < 0)
        engine_back(t, BACK_HANDED, leg, NULL, 0);
    else if (flags & (EXEC_START | EXEC_END | ACTIVITY))
        engine_signal(t);
}

static void *
engine_run(void *arg)
{
    (void)arg;
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(engine_epfd, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        ENGINE_LOCK();
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            uint32_t what = events[i].events;
            /* A Tap taken back since epoll_wait returned is no longer in the table. */
            Tap *t = fd < engine_nfds ? engine_fds[fd] : NULL;
            if (t == NULL || t->owner != OWNER_ENGINE)
                continue;
            int leg = fd == t->fds[0] ? 0 : 1;
            if (what & EPOLLOUT)
                engine_flush(t, leg);
            if (t->owner != OWNER_ENGINE || !(what & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                continue;
            if (t->out[peer_i(leg)] == NULL)
                engine_chunk(t, leg);
            else if (what & (EPOLLHUP | EPOLLERR)) /* paused, and gone: the loop ends it */
                engine_back(t, BACK_END, leg, NULL, 0);
        }
        ENGINE_UNLOCK();
    }
}

/* _tap.engine_start() -> the eventfd the loop watches (started once per process). */
static PyObject *
engine_start(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    if (engine_evfd >= 0)
        return PyLong_FromLong(engine_evfd);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int ev = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_t thread;
    pthread_attr_t attr;
    int rc = -1;
    if (ep >= 0 && ev >= 0) {
        engine_epfd = ep;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        rc = pthread_create(&thread, &attr, engine_run, NULL);
        pthread_attr_destroy(&attr);
    }
    if (rc != 0) {
        if (ep >= 0)
            close(ep);
        if (ev >= 0)
            close(ev);
        engine_epfd = -1;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    engine_evfd = ev;
    return PyLong_FromLong(ev);
}

static PyObject *
take_bytes(char **data, Py_ssize_t *len)
{
    if (*data == NULL)
        return Py_NewRef(Py_None);
    PyObject *b = PyBytes_FromStringAndSize(*data, *len);
    free(*data);
    *data = NULL;
    *len = 0;
    return b;
}

/* The engine's frame in the middle of which leg is, as (remaining, opcode, mask, offset)
   for FrameScanner.adopt(), or None. */
static PyObject *
mid_frame(Tap *t, int leg)
{
    if (!t->rem[leg])
        return Py_NewRef(Py_None);
    return Py_BuildValue("(Liy#L)", t->rem[leg], t->rem_op[leg], (const char *)t->rem_mask[leg],
                         (Py_ssize_t)(leg == 0 ? 4 : 0), t->rem_off[leg]);
}

/* What t has for the loop, as (exec_starts, exec_ends, activity, back, leg,
   (to_client, to_upstream), chunk, (client_mid, upstream_mid), bucket), and clears it. Under the lock (with the GIL: only the
   loop calls this). When the connection was handed back, the engine's frame state goes
   to the loop's scanners. */
static PyObject *
engine_pending(Tap *t)
{
    PyObject *chunk = take_bytes(&t->p_chunk, &t->p_chunk_len);
    PyObject *rest = NULL, *mid = NULL;
    if (t->owner == OWNER_LOOP) { /* handed back: where the engine is, what it holds */
        mid = Py_BuildValue("(NN)", mid_frame(t, 0), mid_frame(t, 1));
        t->rem[0] = t->rem[1] = 0;
        for (int i = 0; i < 2; i++) {
            t->out_pos[i] = t->out[i] ? t->out_pos[i] : 0;
            if (t->out[i] && t->out_pos[i]) { /* drop what was written already */
                memmove(t->out[i], t->out[i] + t->out_pos[i],
                        (size_t)(t->out_len[i] - t->out_pos[i]));
                t->out_len[i] -= t->out_pos[i];
                t->out_pos[i] = 0;
            }
        }
        rest = Py_BuildValue("(NN)", take_bytes(&t->out[0], &t->out_len[0]),
                             take_bytes(&t->out[1], &t->out_len[1]));
    }
    else {
        mid = Py_NewRef(Py_None);
        rest = Py_NewRef(Py_None);
    }
    PyObject *bucket = NULL;
    if (t->owner == OWNER_LOOP && t->lim) { /* what the engine charged goes back too */
        bucket = Py_BuildValue("(dddO)", t->lim_msgs, t->lim_bytes, t->lim_last,
                               t->lim_ok ? Py_True : Py_False);
        t->lim = 0;
    }
    else {
        bucket = Py_NewRef(Py_None);
    }
    PyObject *r = NULL;
    if (rest && chunk && mid && bucket)
        r = Py_BuildValue("(iiiiiOOOO)", t->p_exec_start, t->p_exec_end, t->p_activity,
                          t->p_back, t->p_leg, rest, chunk, mid, bucket);
    Py_XDECREF(bucket);
    Py_XDECREF(rest);
    Py_XDECREF(chunk);
    Py_XDECREF(mid);
    t->p_exec_start = t->p_exec_end = t->p_activity = 0;
    t->p_back = BACK_NONE;
    return r;
}

/* _tap.engine_drain(): runs each ready Tap's on_pending(pending) (the loop's eventfd
   reader). */
static PyObject *
engine_drain(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    uint64_t count;
    ssize_t r = read(engine_evfd, &count, sizeof count);
    (void)r;
    ENGINE_LOCK();
    Tap *ready = engine_ready;
    engine_ready = NULL;
    PyObject *todo = PyList_New(0);
    for (Tap *t = ready, *next; t != NULL; t = next) {
        next = t->next_ready;
        t->queued = 0;
        PyObject *pending = todo ? engine_pending(t) : NULL;
        PyObject *item = pending ? Py_BuildValue("(ON)", (PyObject *)t, pending) : NULL;
        if (item == NULL || PyList_Append(todo, item) < 0)
            Py_CLEAR(todo);
        Py_XDECREF(item);
        if (t->owner == OWNER_LOOP && t->engaged) { /* handed back: the list keeps it */
            t->engaged = 0;
            Py_DECREF(t);
        }
    }
    ENGINE_UNLOCK();
    if (todo == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(todo); i++) {
        PyObject *item = PyList_GET_ITEM(todo, i);
        Tap *t = (Tap *)PyTuple_GET_ITEM(item, 0);
        PyObject *fn = t->cb[ON_PENDING];
        if (fn != NULL && call_drop(fn, PyTuple_GET_ITEM(item, 1)) < 0) {
            /* One relay's failure must not stop the others: report it, go on. */
            PyErr_WriteUnraisable(fn);
        }
    }
    Py_DECREF(todo);
    Py_RETURN_NONE;
}

/* Tap.engage(client_fd, upstream_fd, on_pending, quickack): the sockets the engine may
   relay for this Tap (the loop gives it with give()). */
static PyObject *
Tap_engage(Tap *self, PyObject *args)
{
    int client_fd, upstream_fd, quickack;
    PyObject *on_pending;
    if (!PyArg_ParseTuple(args, "iiOp:engage", &client_fd, &upstream_fd, &on_pending,
                          &quickack))
        return NULL;
    if (engine_evfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is not started");
        return NULL;
    }
    ENGINE_LOCK();
    int top = client_fd > upstream_fd ? client_fd : upstream_fd;
    if (top >= engine_nfds) {
        int size = top + 1024;
        Tap **grown = realloc(engine_fds, (size_t)size * sizeof *grown);
        if (grown == NULL) {
            ENGINE_UNLOCK();
            return PyErr_NoMemory();
        }
        memset(grown + engine_nfds, 0, (size_t)(size - engine_nfds) * sizeof *grown);
        engine_fds = grown;
        engine_nfds = size;
    }
    self->fds[0] = client_fd;
    self->fds[1] = upstream_fd;
    self->quickack_fd = (char)quickack;
    ENGINE_UNLOCK();
    Py_XSETREF(self->cb[ON_PENDING], Py_NewRef(on_pending));
    Py_RETURN_NONE;
}

/* Tap.limit(buckets): the client's limiter state for the engine, as (messages per second,
   message burst, bytes per second, byte burst, messages left, bytes left, last charge),
   or None for no limit. */
static PyObject *
Tap_limit(Tap *self, PyObject *state)
{
    double v[7];
    if (state != Py_None && !PyArg_ParseTuple(state, "ddddddd:limit", &v[0], &v[1], &v[2],
                                              &v[3], &v[4], &v[5], &v[6]))
        return NULL;
    ENGINE_LOCK();
    self->lim = state != Py_None;
    self->lim_ok = 0;
    if (self->lim) {
        self->lim_mrate = v[0];
        self->lim_mburst = v[1];
        self->lim_brate = v[2];
        self->lim_bburst = v[3];
        self->lim_msgs = v[4];
        self->lim_bytes = v[5];
        self->lim_last = v[6];
    }
    ENGINE_UNLOCK();
    Py_RETURN_NONE;
}

/* Tap.give(): the engine reads both sockets from now on (the loop has paused its own
   reading, and nothing of its own waits to be written). */
static PyObject *
Tap_give(Tap *self, PyObject *Py_UNUSED(ignored))
{
    if (self->fds[0] < 0) {
        PyErr_SetString(PyExc_RuntimeError, "engage() first");
        return NULL;
    }
    ENGINE_LOCK();
    int ok = self->owner == OWNER_LOOP;
    for (int leg = 0; ok && leg < 2; leg++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = self->fds[leg]};
        engine_fds[self->fds[leg]] = self;
        if (epoll_ctl(engine_epfd, EPOLL_CTL_ADD, self->fds[leg], &ev) < 0)
            ok = 0;
    }
    if (ok) {
        self->owner = OWNER_ENGINE;
        self->rem[0] = self->rem[1] = 0; /* the loop's scanners are between frames */
        if (!self->engaged) {
            self->engaged = 1;
            Py_INCREF(self); /* the fd table's reference */
        }
    }
    else if (self->owner == OWNER_LOOP) {
        engine_release(self);
    }
    int err = errno;
    ENGINE_UNLOCK();
    if (!ok) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* Tap.take() -> whether the engine had the connection; what it queued for the loop, if
   anything, is run through on_pending first. */
static PyObject *
Tap_take(Tap *self, PyObject *Py_UNUSED(ignored))
{
    ENGINE_LOCK();
    int had = self->owner == OWNER_ENGINE;
    if (had)
        engine_release(self);
    PyObject *pending = NULL;
    if (self->queued) { /* unlink from the ready list: what it queued is handled now */
        Tap **at = &engine_ready;
        while (*at != NULL && *at != self)
            at = &(*at)->next_ready;
        if (*at == self)
            *at = self->next_ready;
        self->queued = 0;
    }
    if (had || self->p_back != BACK_NONE || self->p_exec_start || self->p_exec_end ||
        self->p_activity) {
        if (had)
            self->p_back = self->p_back == BACK_NONE ? BACK_HANDED : self->p_back;
        pending = engine_pending(self);
    }
    int release = self->engaged;
    self->engaged = 0;
    ENGINE_UNLOCK();
    Py_INCREF(self);
    if (release)
        Py_DECREF(self);
    int rc = 0;
    if (pending != NULL && self->cb[ON_PENDING] != NULL)
        rc = call_drop(self->cb[ON_PENDING], pending);
    Py_XDECREF(pending);
    Py_DECREF(self);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(had);
}
#endif /* HAVE_ENGINE */

static PyMethodDef Tap_methods[] = {
    {"client_frame", (PyCFunction)(void (*)(void))Tap_client_frame, METH_FASTCALL,
     "client_frame(opcode, length, head, tail) -> flags: a client data frame started."},
    {"kernel_frame", (PyCFunction)(void (*)(void))Tap_kernel_frame, METH_FASTCALL,
     "kernel_frame(opcode, length, head, tail) -> flags: a kernel data frame started."},
    {"take_counts", (PyCFunction)Tap_take_counts, METH_NOARGS,
     "The non-zero tallies as (direction, channel, messages, bytes), reset to zero."},
    {"wire", (PyCFunction)Tap_wire, METH_VARARGS,
     "wire(write_upstream, write_client, slow_from_client, slow_from_upstream, on_event, "
     "quickack, limiter, on_delay, max_client, max_kernel): relay chunks from now on."},
#if HAVE_ENGINE
    {"engage", (PyCFunction)Tap_engage, METH_VARARGS,
     "engage(client_fd, upstream_fd, on_pending, quickack): sockets the engine may relay."},
    {"give", (PyCFunction)Tap_give, METH_NOARGS, "The engine reads both sockets from now on."},
    {"limit", (PyCFunction)Tap_limit, METH_O,
     "limit(buckets or None): the client's rate-limit state for the engine."},
    {"take", (PyCFunction)Tap_take, METH_NOARGS,
     "The loop reads both sockets again; True if the engine had them."},
#endif
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
    {"owed", T_INT, offsetof(Tap, owed), 0, NULL},
    {"owed_idle", T_INT, offsetof(Tap, owed_idle), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* ticking and dirty: the flush timer's flags, which the engine thread reads and sets
   too (under the engine lock). */
static PyObject *
flag_get(Tap *self, void *offset)
{
    ENGINE_LOCK();
    int value = *((char *)self + (size_t)offset);
    ENGINE_UNLOCK();
    return PyBool_FromLong(value);
}

static int
flag_set(Tap *self, PyObject *value, void *offset)
{
    if (value == NULL || !PyBool_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "a bool is needed");
        return -1;
    }
    ENGINE_LOCK();
    *((char *)self + (size_t)offset) = value == Py_True;
    ENGINE_UNLOCK();
    return 0;
}

static PyGetSetDef Tap_getset[] = {
    {"ticking", (getter)flag_get, (setter)flag_set, "A flush timer runs.",
     (void *)offsetof(Tap, ticking)},
    {"dirty", (getter)flag_get, (setter)flag_set, "Activity came while it ran.",
     (void *)offsetof(Tap, dirty)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.proxy._tap.Tap",
    .tp_basicsize = sizeof(Tap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Per-frame bookkeeping of a relayed kernel WebSocket, with its fast path "
              "(see broker/proxy/tap.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Tap_init,
    .tp_dealloc = (destructor)Tap_dealloc,
    .tp_traverse = (traverseproc)Tap_traverse,
    .tp_clear = (inquiry)Tap_clear,
    .tp_methods = Tap_methods,
    .tp_members = Tap_members,
    .tp_getset = Tap_getset,
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
#if HAVE_ENGINE
    {"engine_start", engine_start, METH_NOARGS,
     "Start the relay engine thread (once); the eventfd the loop must watch."},
    {"engine_drain", engine_drain, METH_NOARGS,
     "Run what the engine queued for the loop (the eventfd's reader)."},
#endif
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
