# Upstream response heads (see _relay.pyx).
from expserver._http cimport Request

cdef class ResponseHead:
    cdef public int status
    cdef public int version
    cdef public long long length    # -1: none
    cdef public bint chunked
    cdef public bint close          # the upstream will not keep the connection
    cdef public bytes upgrade       # its Upgrade value (relayed only with a 101)
    cdef public set named           # other fields its Connection names (None: none)
    cdef Py_ssize_t relayed         # bytes of its end-to-end field lines (named ones too)
    cdef Py_ssize_t length_line     # bytes of its Content-Length line

cdef int parse_status_line(const unsigned char *p, Py_ssize_t n, ResponseHead head) except -2
cdef int scan_fields(const unsigned char *p, Py_ssize_t start, Py_ssize_t end,
                     ResponseHead head) except -2
cdef bytes relay_head(const unsigned char *p, Py_ssize_t fields_start, Py_ssize_t end,
                      ResponseHead head, bint with_length, bytes tail)
cdef bytes with_policy(Request req, int status, bytes relayed, bytes tail)
