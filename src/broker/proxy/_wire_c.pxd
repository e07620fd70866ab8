# C types for the compiled build of the relay's per-frame module (_wire_c.py is a link
# to _wire_py.py, the one implementation; Cython reads this file beside it). Nothing
# here changes behaviour: tests/proxy/test_wire.py holds both builds to the same.

cimport cython


cpdef bint valid_close_code(Py_ssize_t code)
ctypedef unsigned char* uchar_p
ctypedef const unsigned char* const_uchar_p

@cython.locals(n=Py_ssize_t, shift=Py_ssize_t, i=Py_ssize_t, result=bytearray, out=uchar_p,
               k=const_uchar_p)
cpdef bytes mask(bytes data, bytes key, Py_ssize_t offset=*)
@cython.locals(at=Py_ssize_t)
cpdef int channel_of(int opcode, bytes head, bytes tail)
@cython.locals(n=Py_ssize_t, quote=Py_ssize_t, close=Py_ssize_t)
cdef object _quoted(bytes text, Py_ssize_t start)
@cython.locals(at=Py_ssize_t)
cpdef object state_of(bytes head, bytes tail)
@cython.locals(at=Py_ssize_t)
cpdef object msg_id_of(bytes head)


cdef class Tap:
    cdef public bint ended, client_active, upstream_active, mid_reply, busy, ticking, dirty
    cdef public Py_ssize_t owed, owed_idle
    cdef public list awaiting
    cdef list _counts

    cdef int _activity(self)
    @cython.locals(channel=int, flags=int)
    cpdef int client_frame(self, int opcode, Py_ssize_t length, bytes head, bytes tail)
    @cython.locals(channel=int, flags=int)
    cpdef int kernel_frame(self, int opcode, Py_ssize_t length, bytes head, bytes tail)
    @cython.locals(i=Py_ssize_t)
    cdef _idle(self, bytes head)


cdef class FrameEvent:
    cdef public int opcode
    cdef public Py_ssize_t length
    cdef public bint fin
    cdef public bytes head, tail


cdef class FrameScanner:
    cdef public bint server, closed, clean_cut
    cdef public Py_ssize_t max_message, message_length, error_at
    cdef public object close_code
    cdef public int error
    cdef public str error_reason
    cdef bint _fragmented, _text
    cdef Py_ssize_t _peek, _remaining, _offset
    cdef int _opcode
    cdef bytes _head, _key, _close
    cdef object _utf8
    cdef FrameEvent _ev, _fast
    cdef list _fast_list

    cdef _fail(self, int code, str reason, Py_ssize_t at)
    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, base=Py_ssize_t, take=Py_ssize_t,
                   b0=int, b1=int, need=Py_ssize_t, at=Py_ssize_t, opcode=int, fin=bint,
                   start=Py_ssize_t)
    cpdef list scan(self, bytes data)
    @cython.locals(n=Py_ssize_t, b0=int, b1=int, length=Py_ssize_t, at=Py_ssize_t,
                   peek=Py_ssize_t, ev=FrameEvent)
    cdef object _whole_frame(self, bytes data)
    cdef bint _check_header(self, int b0, int b1, int opcode, bint fin, object length,
                            Py_ssize_t start)
    @cython.locals(offset=Py_ssize_t, last=bint, at=Py_ssize_t, ev=FrameEvent)
    cdef bint _observe(self, bytes data, Py_ssize_t pos, Py_ssize_t take, Py_ssize_t start)
    @cython.locals(code=Py_ssize_t)
    cdef bint _frame_done(self, Py_ssize_t start)


cdef class Pump:
    cdef public bint from_client
    cdef public FrameScanner scanner
    cdef public Tap tap
    cdef public object write, on_error, on_delay, on_event, limiter, quickack
    cdef int _events

    @cython.locals(tap=Tap, scanner=FrameScanner, frames=list, error=int, ev=FrameEvent,
                   flags=int, delay=double, wait=double)
    cpdef feed(self, bytes data)
