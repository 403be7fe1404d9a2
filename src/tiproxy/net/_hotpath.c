/*
 * The relay's per-query path in C: one command in, one whole response out, for a session with
 * nothing else going on. net/relay.py calls these first; each either does everything the
 * Python path would have done for those bytes and returns True, or does nothing that the
 * Python path would not do too and returns False, and the Python path takes the bytes.
 *
 * command(session, data) -> bool
 *   `data` from the client is one whole command packet (sequence id 0, under 16 MiB) that goes
 *   to the backend untouched: a command of relay._FAST, a COM_QUERY whose text the relay need
 *   not read (the same tests as statements.py's, byte for byte), or a COM_STMT_EXECUTE of a
 *   statement with nothing pending (commands.py's _execute_is_plain), or a COM_STMT_RESET of
 *   a statement the proxy knows (_reset_is_plain). The session is in its
 *   command phase with no bytes held, no move, capture, compression, file upload or pending
 *   response. Sends it, counts it, and tells the tracker what comes back.
 *
 * response(session, data) -> bool
 *   `data` from the backend is exactly the whole answer the tracker waits for, a result or
 *   an OK (scan_whole, protocol/_scan.h), and not an error; nothing intercepts, rewrites,
 *   records or replays it. Sends it to the client, counts it, ends the tracker's response and
 *   does what Session._response_done does for a command whose token is its byte.
 *
 * configure(...) hands over the Python objects these read (see relay.py's call).
 *
 * Python (relay.py, commands.py and tracker.py) stays the reference: everything these refuse,
 * it does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>

#include "../protocol/_scan.h"
#include "_hotpath.h"

#define MAX_PAYLOAD 0xFFFFFF
#define COM_QUERY 0x03
#define COM_STMT_EXECUTE 0x17
#define COM_STMT_RESET 0x1A
#define LAST_PREPARED_ID 0xFFFFFFFFu
#define TRACKER_IDLE 0     /* responses.py's phases (relay.py checks them: TRACKER_PHASES) */
#define TRACKER_FIRST 1
#define TRACKER_SINGLE 5

/* What configure() hands over. */
static long phase_command = -1;                  /* login_phase.COMMAND */
static PyObject *plan_kind[256];                 /* Expect of a fast command, or NULL */
static long plan_binary[256];                    /* the tracker's _binary for it */
static long plan_phase[256];                     /* the tracker's first phase for it */
static unsigned char state_first[256];           /* statements.STATE_FIRST_BYTES */
static unsigned char letters[256];               /* statements.LETTERS */
static unsigned char compound_first[256];        /* statements.COMPOUND_FIRST_BYTES */
static PyObject *state_prefixes;                 /* statements.STATE_PREFIXES (frozenset) */
static PyObject *compound_match;                 /* statements.COMPOUND_START.match */
static int configured;

/* The slotted classes whose fields these read and write in place (configure() finds where). */
static PyTypeObject *tracker_type, *counts_type, *histogram_type;
enum { T_PHASE, T_PENDING, T_LOCAL_INFILE, T_BINARY, T_SKIP, T_CARRY, T_CONTINUED,
       T_DEPRECATE_EOF, T_STATUS, T_PACKETS, T_COUNT };
static const char *tracker_fields[T_COUNT] = {"phase", "_pending", "local_infile", "_binary",
    "_skip", "_carry", "_continued", "deprecate_eof", "status", "packets"};
static Py_ssize_t tracker_at[T_COUNT];
enum { C_IN_BYTES, C_IN_PACKETS, C_OUT_BYTES, C_OUT_PACKETS, C_COMMANDS, C_COUNT };
static const char *counts_fields[C_COUNT] = {"in_bytes", "in_packets", "out_bytes",
    "out_packets", "commands"};
static Py_ssize_t counts_at[C_COUNT];
enum { H_BOUNDS, H_COUNTS, H_TOTAL, H_COUNT };
static const char *histogram_fields[H_COUNT] = {"bounds", "counts", "total"};
static Py_ssize_t histogram_at[H_COUNT];

/* A slot's value (borrowed; NULL when unset), and setting one (a new reference to v). */
#define SLOT(obj, at) (*(PyObject **)((char *)(obj) + (at)))
static void
slot_set(PyObject *obj, Py_ssize_t at, PyObject *v)
{
    PyObject *old = SLOT(obj, at);
    Py_INCREF(v);
    SLOT(obj, at) = v;
    Py_XDECREF(old);
}

/* Attribute names, interned once. */
#define NAMES(X)                                                                             \
    X(phase) X(_decompress) X(tracker) X(_cbuf) X(_held) X(_ccont) X(local_infile) X(_move)  \
    X(stale) X(lost_transaction) X(leaving) X(_capture) X(_pending) X(state) X(table_locks)  \
    X(_multi) X(to_client) X(stmts) X(params) X(param_types) X(types_sent) X(long_data)       \
    X(cursor_open) X(effects) X(renames) X(variables) X(kill) X(inflight) X(last_command)     \
    X(bt) X(write) X(_traffic) X(out_bytes) X(out_packets) X(in_bytes) X(in_packets) X(_cross)     \
    X(server) X(metrics) X(cross_location_bytes) X(_sent) X(_binary) X(replay_limit)         \
    X(_intercept) X(held_answer) X(_rewriter) X(_skip) X(_carry) X(_continued)               \
    X(deprecate_eof) X(status) X(client) X(packets) X(popleft) X(last_answer) X(commands)    \
    X(bounds) X(counts) X(total) X(_opened) X(_ages) X(append)                                \
    X(get_write_buffer_size)
#define DECLARE(name) static PyObject *s_##name;
NAMES(DECLARE)
#undef DECLARE

static int
intern_names(void)
{
#define INTERN(name) \
    if ((s_##name = PyUnicode_InternFromString(#name)) == NULL) return -1;
    NAMES(INTERN)
#undef INTERN
    return 0;
}

/* -- small helpers: each returns -1 with an exception set on failure -------------------- */

/* An attribute of the session: from its own dict (one lookup), else as Python finds it (the
 * class's defaults). relay.py checks that none of these names is a descriptor. New reference. */
static PyObject *
sget(PyObject *d, PyObject *s, PyObject *name)
{
    PyObject *v = PyDict_GetItemWithError(d, name);
    if (v != NULL) {
        Py_INCREF(v);
        return v;
    }
    return PyErr_Occurred() ? NULL : PyObject_GetAttr(s, name);
}

/* 1 if the attribute is true, 0 if false. */
static int
s_true(PyObject *d, PyObject *s, PyObject *name)
{
    PyObject *v = sget(d, s, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* 1 if the attribute is None, 0 if not. */
static int
s_none(PyObject *d, PyObject *s, PyObject *name)
{
    PyObject *v = sget(d, s, name);
    if (v == NULL)
        return -1;
    int r = v == Py_None;
    Py_DECREF(v);
    return r;
}

/* A slot holding an int, as a C long; -1 with an exception if it is not one. */
static int
slot_long(PyObject *obj, Py_ssize_t at, long *out)
{
    PyObject *v = SLOT(obj, at);
    if (v == NULL || !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "an int field is unset or not an int");
        return -1;
    }
    *out = PyLong_AsLong(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int
slot_set_long(PyObject *obj, Py_ssize_t at, long value)
{
    PyObject *v = PyLong_FromLong(value);
    if (v == NULL)
        return -1;
    slot_set(obj, at, v);
    Py_DECREF(v);
    return 0;
}

/* slot += delta (an int slot) */
static int
slot_add(PyObject *obj, Py_ssize_t at, Py_ssize_t delta)
{
    PyObject *v = SLOT(obj, at);
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a counter is unset");
        return -1;
    }
    PyObject *d = PyLong_FromSsize_t(delta);
    if (d == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(v, d);
    Py_DECREF(d);
    if (sum == NULL)
        return -1;
    slot_set(obj, at, sum);
    Py_DECREF(sum);
    return 0;
}

/* obj.name += delta, for any object */
static int
add_attr(PyObject *obj, PyObject *name, Py_ssize_t delta)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromSsize_t(delta);
    if (d == NULL) {
        Py_DECREF(v);
        return -1;
    }
    PyObject *sum = PyNumber_Add(v, d);
    Py_DECREF(v);
    Py_DECREF(d);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

/* What time.monotonic() reads, on the clock it reads on Linux. */
static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* counters.Histogram.observe: counts[bisect_left(bounds, value)] += 1; total += value */
static int
observe(PyObject *hist, double value)
{
    if (Py_TYPE(hist) != histogram_type) {
        PyErr_SetString(PyExc_TypeError, "not a counters.Histogram");
        return -1;
    }
    PyObject *bounds = SLOT(hist, histogram_at[H_BOUNDS]);
    PyObject *counts = SLOT(hist, histogram_at[H_COUNTS]);
    PyObject *total = SLOT(hist, histogram_at[H_TOTAL]);
    if (bounds == NULL || counts == NULL || total == NULL || !PyTuple_Check(bounds)
        || !PyList_Check(counts) || PyList_GET_SIZE(counts) <= PyTuple_GET_SIZE(bounds)) {
        PyErr_SetString(PyExc_TypeError, "a histogram's bounds, counts and total");
        return -1;
    }
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(bounds);
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        double bound = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, mid));
        if (bound == -1.0 && PyErr_Occurred())
            return -1;
        if (bound < value)
            lo = mid + 1;
        else
            hi = mid;
    }
    long long count = PyLong_AsLongLong(PyList_GET_ITEM(counts, lo));
    if (count == -1 && PyErr_Occurred())
        return -1;
    PyObject *v = PyLong_FromLongLong(count + 1);
    if (v == NULL)
        return -1;
    PyList_SetItem(counts, lo, v);  /* steals v */
    double t = PyFloat_AsDouble(total);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if ((v = PyFloat_FromDouble(t + value)) == NULL)
        return -1;
    slot_set(hist, histogram_at[H_TOTAL], v);
    Py_DECREF(v);
    return 0;
}

/* Whether needle (lower case) occurs in hay, ignoring ASCII case. */
static int
contains_folded(const unsigned char *hay, Py_ssize_t n, const char *needle)
{
    Py_ssize_t m = (Py_ssize_t)strlen(needle);
    for (Py_ssize_t i = 0; i + m <= n; i++) {
        Py_ssize_t k = 0;
        while (k < m) {
            unsigned char c = hay[i + k];
            if (c >= 'A' && c <= 'Z')
                c += 'a' - 'A';
            if (c != (unsigned char)needle[k])
                break;
            k++;
        }
        if (k == m)
            return 1;
    }
    return 0;
}

/* relay.py's fast-path test of a COM_QUERY's text: 1 if it need not be read, 0 if it must. */
static int
query_is_plain(PyObject *d, PyObject *s, PyObject *sd, PyObject *state, PyObject *data,
               const unsigned char *p, Py_ssize_t n)
{
    int r = s_true(sd, state, s_table_locks);
    if (r != 0)
        return r < 0 ? -1 : 0;
    unsigned char first = p[5];
    if (state_first[first]) {
        if (!letters[first] || n < 9)
            return 0;  /* (a text under 4 bytes: left to the Python path) */
        char upper[4];
        for (int i = 0; i < 4; i++) {
            unsigned char c = p[5 + i];
            upper[i] = (char)(c >= 'a' && c <= 'z' ? c - ('a' - 'A') : c);
        }
        PyObject *prefix = PyBytes_FromStringAndSize(upper, 4);
        if (prefix == NULL)
            return -1;
        r = PySet_Contains(state_prefixes, prefix);
        Py_DECREF(prefix);
        if (r != 0)
            return r < 0 ? -1 : 0;
    }
    if (memchr(p, '@', (size_t)n) != NULL)
        return 0;
    if (memchr(p, ';', (size_t)n) != NULL) {
        r = s_true(d, s, s__multi);
        if (r != 0)
            return r < 0 ? -1 : 0;
    }
    if (compound_first[first]) {
        PyObject *five = PyLong_FromLong(5);
        if (five == NULL)
            return -1;
        PyObject *m = PyObject_CallFunctionObjArgs(compound_match, data, five, NULL);
        Py_DECREF(five);
        if (m == NULL)
            return -1;
        r = m != Py_None;
        Py_DECREF(m);
        if (r)
            return 0;
    }
    /* named locks and connection ids, in any letter case */
    return !(contains_folded(p, n, "_lock") || contains_folded(p, n, "ection_id")
             || contains_folded(p, n, "ocesslist"));
}

/* The statement id a COM_STMT_* packet starts with (p[5..9)). */
static inline unsigned long
stmt_id_of(const unsigned char *p)
{
    return (unsigned long)p[5] | (unsigned long)p[6] << 8 | (unsigned long)p[7] << 16
           | (unsigned long)p[8] << 24;
}

/* The statement it names, from state.stmts: a new reference; NULL with an exception set, or
 * NULL alone when the proxy does not know the id. */
static PyObject *
statement_of(PyObject *sd, PyObject *state, const unsigned char *p)
{
    PyObject *stmts = sget(sd, state, s_stmts);
    if (stmts == NULL)
        return NULL;
    PyObject *key = PyLong_FromUnsignedLong(stmt_id_of(p));
    if (key == NULL) {
        Py_DECREF(stmts);
        return NULL;
    }
    PyObject *stmt = PyDict_Check(stmts) ? PyDict_GetItemWithError(stmts, key) : NULL;
    Py_DECREF(key);
    Py_XINCREF(stmt);
    Py_DECREF(stmts);
    return stmt;
}

/* Session._reset_is_plain: a COM_STMT_RESET of a statement the proxy knows: it has no long
 * data and no open cursor from now on (1); 0 for any other (the Python path's). */
static int
reset_statement(PyObject *sd, PyObject *state, const unsigned char *p, Py_ssize_t n)
{
    if (n != 4 + 5)
        return 0;
    PyObject *stmt = statement_of(sd, state, p);
    if (stmt == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int r = PyObject_SetAttr(stmt, s_long_data, Py_False) < 0
            || PyObject_SetAttr(stmt, s_cursor_open, Py_False) < 0 ? -1 : 1;
    Py_DECREF(stmt);
    return r;
}

/* Session._execute_is_plain: 1 plain, 0 not (or too short: the Python path says why). May set
 * the statement's param_types and types_sent, as the Python one does (the same values). */
static int
execute_is_plain(PyObject *sd, PyObject *state, const unsigned char *p, Py_ssize_t n)
{
    if (n < 4 + 10)
        return 0;
    PyObject *stmt = statement_of(sd, state, p);
    if (stmt == NULL)  /* unknown: the one prepared last (its types are recorded), or none */
        return PyErr_Occurred() ? -1 : stmt_id_of(p) != LAST_PREPARED_ID;
    int r = -1;
    PyObject *d = PyObject_GenericGetDict(stmt, NULL), *v = NULL;
    if (d == NULL || (v = sget(d, stmt, s_params)) == NULL)
        goto done;
    long params = PyLong_AsLong(v);
    if (params == -1 && PyErr_Occurred())
        goto done;
    unsigned char flags = p[4 + 5];
    int sends_types = 0;
    if (params > 0) {
        Py_ssize_t bound_at = 4 + 10 + (params + 7) / 8;
        if (bound_at >= n) {
            r = 0;  /* malformed: the Python path raises its protocol error */
            goto done;
        }
        if (p[bound_at] == 1) {
            if (bound_at + 1 + 2 * params > n) {
                r = 0;
                goto done;
            }
            PyObject *types = PyBytes_FromStringAndSize((const char *)p + bound_at + 1,
                                                        2 * params);
            if (types == NULL)
                goto done;
            int set = PyObject_SetAttr(stmt, s_param_types, types);
            Py_DECREF(types);
            if (set < 0 || PyObject_SetAttr(stmt, s_types_sent, Py_True) < 0)
                goto done;
            sends_types = 1;
        }
    }
    int t;
    if (!sends_types) {
        if ((t = s_true(d, stmt, s_types_sent)) < 0)
            goto done;
        if (!t) {
            if ((t = s_none(d, stmt, s_param_types)) != 1) {
                r = t < 0 ? -1 : 0;
                goto done;
            }
        }
    }
    if (flags) {
        r = 0;
        goto done;
    }
    if ((t = s_true(d, stmt, s_long_data)) != 0 || (t = s_true(d, stmt, s_cursor_open)) != 0
        || (t = s_true(d, stmt, s_renames)) != 0) {
        r = t < 0 ? -1 : 0;
        goto done;
    }
    if ((t = s_none(d, stmt, s_effects)) != 1 || (t = s_none(d, stmt, s_variables)) != 1
        || (t = s_none(d, stmt, s_kill)) != 1) {  /* a prepared KILL is the proxy's to run */
        r = t < 0 ? -1 : 0;
        goto done;
    }
    r = 1;
done:
    Py_XDECREF(v);
    Py_XDECREF(d);
    Py_DECREF(stmt);
    return r;
}

/* Whether the session has nothing going on that the Python path must see: 1 yes, 0 no. */
static int
session_is_plain(PyObject *d, PyObject *s, int for_response)
{
    PyObject *phase = sget(d, s, s_phase);
    if (phase == NULL)
        return -1;
    long value = PyLong_AsLong(phase);
    Py_DECREF(phase);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value != phase_command)
        return 0;
    int r;
    if ((r = s_none(d, s, s__decompress)) != 1 || (r = s_none(d, s, s__capture)) != 1
        || (r = s_none(d, s, s__move)) != 1)
        return r < 0 ? -1 : 0;
    if ((r = s_true(d, s, s__held)) != 0)
        return r < 0 ? -1 : 0;
    if (for_response) {
        if ((r = s_true(d, s, s_replay_limit)) != 0)
            return r < 0 ? -1 : 0;
        if ((r = s_none(d, s, s__intercept)) != 1 || (r = s_none(d, s, s_held_answer)) != 1
            || (r = s_none(d, s, s__rewriter)) != 1)
            return r < 0 ? -1 : 0;
        return 1;
    }
    if ((r = s_true(d, s, s__cbuf)) != 0 || (r = s_true(d, s, s__ccont)) != 0
        || (r = s_true(d, s, s_stale)) != 0 || (r = s_true(d, s, s_lost_transaction)) != 0)
        return r < 0 ? -1 : 0;
    if ((r = s_none(d, s, s_leaving)) != 1)
        return r < 0 ? -1 : 0;
    return 1;
}

/* self.server.metrics.cross_location_bytes += n, if the session's backend is elsewhere. */
static int
count_cross(PyObject *d, PyObject *s, Py_ssize_t n)
{
    int cross = s_true(d, s, s__cross);
    if (cross <= 0)
        return cross;
    PyObject *server = sget(d, s, s_server);
    if (server == NULL)
        return -1;
    PyObject *metrics = PyObject_GetAttr(server, s_metrics);
    Py_DECREF(server);
    if (metrics == NULL)
        return -1;
    int r = add_attr(metrics, s_cross_location_bytes, n);
    Py_DECREF(metrics);
    return r;
}

/* The session's tracker, if it is a ResponseTracker with every field the paths use set. */
static PyObject *
tracker_of(PyObject *d, PyObject *s)
{
    PyObject *t = sget(d, s, s_tracker);
    if (t == NULL)
        return NULL;
    if (Py_TYPE(t) != tracker_type) {
        Py_DECREF(t);
        return Py_None;  /* (borrowed None: "refuse") */
    }
    for (int i = 0; i < T_COUNT; i++) {
        if (SLOT(t, tracker_at[i]) == NULL) {
            Py_DECREF(t);
            return Py_None;
        }
    }
    return t;
}

/* The session's counters, if they are a BackendCounts with every field set; new reference. */
static PyObject *
counts_of(PyObject *d, PyObject *s)
{
    PyObject *c = sget(d, s, s__traffic);
    if (c == NULL)
        return NULL;
    if (Py_TYPE(c) != counts_type) {
        Py_DECREF(c);
        PyErr_SetString(PyExc_TypeError, "Session._traffic is not a BackendCounts");
        return NULL;
    }
    for (int i = 0; i < C_COUNT; i++) {
        if (SLOT(c, counts_at[i]) == NULL) {
            Py_DECREF(c);
            PyErr_SetString(PyExc_AttributeError, "a BackendCounts field is unset");
            return NULL;
        }
    }
    return c;
}

/* The chunk of a command() or response() call: 1 with its bytes, 0 when the compiled path
 * cannot take it (not configured, not bytes), -1 (TypeError) on a wrong call. */
static int
chunk_of(PyObject *const *args, Py_ssize_t nargs, const char *usage,
         const unsigned char **p, Py_ssize_t *n)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (!configured || !PyBytes_CheckExact(args[1]))
        return 0;
    *p = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    *n = PyBytes_GET_SIZE(args[1]);
    return 1;
}

/* Set by a DirectLeg (net/_direct.c) while it serves a chunk: the other leg's transport and a
 * descriptor of its socket, which send_on writes to itself. */
struct direct_out hotpath_out = {-1, NULL, NULL, NULL, 0};

Py_ssize_t
held_back(PyObject *transport)
{
    PyObject *held = PyObject_CallMethodNoArgs(transport, s_get_write_buffer_size);
    if (held == NULL)
        return -1;
    Py_ssize_t pending = PyLong_AsSsize_t(held);
    Py_DECREF(held);
    return pending;
}

int
write_to(PyObject *transport, PyObject *data)
{
    PyObject *written = PyObject_CallMethodOneArg(transport, s_write, data);
    if (written == NULL)
        return -1;
    Py_DECREF(written);
    return 0;
}

/* Straight to the socket when the transport holds nothing back (else the bytes would overtake
 * what it holds); what the socket does not take, and any error, goes to the transport, which
 * sends the rest when it can or meets the error itself. */
static int
send_direct(PyObject *transport, PyObject *data)
{
    if (hotpath_out.ssl != NULL)
        return direct_send_tls(transport, data);
    Py_ssize_t pending = held_back(transport);
    if (pending < 0)
        return -1;
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t sent = 0;
    if (pending == 0) {
        sent = send(hotpath_out.fd, p, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent == n)
            return 0;
        if (sent < 0)
            sent = 0;  /* full (EAGAIN) or an error: the transport's write meets it */
    }
    PyObject *rest = sent ? PyBytes_FromStringAndSize(p + sent, n - sent) : Py_NewRef(data);
    if (rest == NULL)
        return -1;
    int r = write_to(transport, rest);
    Py_DECREF(rest);
    return r;
}

/* session.<leg>.write(data): the transport named `leg` (bt or client). */
static int
send_on(PyObject *d, PyObject *s, PyObject *leg, PyObject *data)
{
    PyObject *transport = sget(d, s, leg);
    if (transport == NULL)
        return -1;
    int r = transport == hotpath_out.transport ? send_direct(transport, data)
                                                : write_to(transport, data);
    Py_DECREF(transport);
    return r;
}

PyObject *
hotpath_command(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *p;
    Py_ssize_t n;
    int took = chunk_of(args, nargs, "command(session, data)", &p, &n);
    if (took <= 0)
        return took < 0 ? NULL : Py_NewRef(Py_False);
    PyObject *s = args[0], *data = args[1];
    if (n <= 5)
        Py_RETURN_FALSE;
    Py_ssize_t length = (Py_ssize_t)p[0] | (Py_ssize_t)p[1] << 8 | (Py_ssize_t)p[2] << 16;
    if (p[3] != 0 || length + 4 != n || length >= MAX_PAYLOAD)
        Py_RETURN_FALSE;
    int cmd = p[4];
    if (plan_kind[cmd] == NULL)
        Py_RETURN_FALSE;

    PyObject *d = NULL, *tracker = NULL, *state = NULL, *sd = NULL, *obj = NULL;
    PyObject *cmd_obj = NULL, *result = NULL;
    int r;
    if ((d = PyObject_GenericGetDict(s, NULL)) == NULL)
        goto fail;
    if ((r = session_is_plain(d, s, 0)) <= 0)
        goto refuse;
    if ((tracker = tracker_of(d, s)) == NULL)
        goto fail;
    if (tracker == Py_None) {
        tracker = NULL;
        goto refuse_ok;
    }
    long tphase;
    if (slot_long(tracker, tracker_at[T_PHASE], &tphase) < 0)
        goto fail;
    PyObject *pending = SLOT(tracker, tracker_at[T_PENDING]);
    if (tphase != TRACKER_IDLE)  /* a pipeline: the Python path sees it */
        goto refuse_ok;
    if ((r = PyObject_IsTrue(SLOT(tracker, tracker_at[T_LOCAL_INFILE]))) != 0) {
        r = r < 0 ? -1 : 0;  /* a file upload */
        goto refuse;
    }
    Py_ssize_t waiting = PyObject_Size(pending);
    if (waiting != 0) {
        r = waiting < 0 ? -1 : 0;
        goto refuse;
    }
    if ((state = sget(d, s, s_state)) == NULL || (sd = PyObject_GenericGetDict(state, NULL)) == NULL)
        goto fail;
    if (cmd == COM_QUERY) {
        if ((r = query_is_plain(d, s, sd, state, data, p, n)) <= 0)
            goto refuse;
    } else if (cmd == COM_STMT_EXECUTE || cmd == COM_STMT_RESET) {
        if ((r = s_true(sd, state, s_to_client)) != 0) {  /* ids to translate: Python's */
            r = r < 0 ? -1 : 0;
            goto refuse;
        }
        r = cmd == COM_STMT_EXECUTE ? execute_is_plain(sd, state, p, n)
                                    : reset_statement(sd, state, p, n);
        if (r <= 0)
            goto refuse;
    }

    /* It goes. */
    if (PyDict_SetItem(d, s_inflight, data) < 0 || PyDict_SetItem(d, s_last_command, data) < 0)
        goto fail;
    if (send_on(d, s, s_bt, data) < 0)
        goto fail;
    if ((obj = counts_of(d, s)) == NULL)
        goto fail;
    if (slot_add(obj, counts_at[C_OUT_BYTES], n) < 0
        || slot_add(obj, counts_at[C_OUT_PACKETS], 1) < 0)
        goto fail;
    Py_CLEAR(obj);
    if (count_cross(d, s, n) < 0)
        goto fail;
    if ((cmd_obj = PyLong_FromLong(cmd)) == NULL)
        goto fail;
    if ((obj = sget(d, s, s__sent)) == NULL)
        goto fail;
    PyObject *item, *when = PyFloat_FromDouble(monotonic());
    if (when == NULL)
        goto fail;
    item = PyTuple_Pack(2, cmd_obj, when);
    Py_DECREF(when);
    if (item == NULL)
        goto fail;
    r = PyList_Check(obj) ? PyList_Append(obj, item) : -1;
    Py_DECREF(item);
    Py_CLEAR(obj);
    if (r < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "Session._sent is a list");
        goto fail;
    }
    /* tracker.expect(kind, cmd), with nothing pending: the response starts at once */
    if ((item = PyTuple_Pack(2, plan_kind[cmd], cmd_obj)) == NULL)
        goto fail;
    PyObject *appended = PyObject_CallMethodOneArg(pending, s_append, item);
    Py_DECREF(item);
    if (appended == NULL)
        goto fail;
    Py_DECREF(appended);
    if (slot_set_long(tracker, tracker_at[T_BINARY], plan_binary[cmd]) < 0
        || slot_set_long(tracker, tracker_at[T_PHASE], plan_phase[cmd]) < 0)
        goto fail;
    result = Py_True;
    goto done;
refuse_ok:
    r = 0;
refuse:
    if (r < 0)
        goto fail;
    result = Py_False;
    goto done;
fail:
    result = NULL;
done:
    Py_XDECREF(d);
    Py_XDECREF(tracker);
    Py_XDECREF(state);
    Py_XDECREF(sd);
    Py_XDECREF(obj);
    Py_XDECREF(cmd_obj);
    Py_XINCREF(result);
    return result;
}

/* Session._response_done for a command whose token is its byte, at `now`. */
static int
response_done(PyObject *d, PyObject *s, PyObject *counts, double now)
{
    PyObject *sent = sget(d, s, s__sent);
    if (sent == NULL)
        return -1;
    if (!PyList_Check(sent) || PyList_GET_SIZE(sent) == 0) {
        Py_DECREF(sent);
        return 0;
    }
    PyObject *first = PyList_GET_ITEM(sent, 0);
    Py_INCREF(first);
    int r = PyList_SetSlice(sent, 0, 1, NULL);
    Py_DECREF(sent);
    if (r < 0 || !PyTuple_Check(first) || PyTuple_GET_SIZE(first) != 2) {
        if (r == 0)
            PyErr_SetString(PyExc_TypeError, "Session._sent holds (command, time) pairs");
        Py_DECREF(first);
        return -1;
    }
    r = -1;
    PyObject *f = NULL, *times = NULL, *opened = NULL, *ages = NULL;
    double started = PyFloat_AsDouble(PyTuple_GET_ITEM(first, 1));
    if (started == -1.0 && PyErr_Occurred())
        goto done;
    if ((f = PyFloat_FromDouble(now)) == NULL || PyDict_SetItem(d, s_last_answer, f) < 0)
        goto done;
    times = PyObject_GetItem(SLOT(counts, counts_at[C_COMMANDS]), PyTuple_GET_ITEM(first, 0));
    if (times == NULL || observe(times, now - started) < 0)
        goto done;
    if ((opened = sget(d, s, s__opened)) == NULL)
        goto done;
    double age = started - PyFloat_AsDouble(opened);
    if (PyErr_Occurred() || (ages = sget(d, s, s__ages)) == NULL || observe(ages, age) < 0)
        goto done;
    r = 0;
done:
    Py_DECREF(first);
    Py_XDECREF(f);
    Py_XDECREF(times);
    Py_XDECREF(opened);
    Py_XDECREF(ages);
    return r;
}

/* The one packet a command such as COM_PING or COM_STMT_RESET gets back, wholly in p[0..n)
 * and not an ERR: 1, with the status after it (an OK's or an EOF's, else unchanged), as the
 * tracker's SINGLE phase takes it; else 0. */
static int
scan_single(const unsigned char *p, Py_ssize_t n, long status, long *status_out,
            Py_ssize_t *packets_out)
{
    if (n < 5)
        return 0;
    Py_ssize_t len = (Py_ssize_t)p[0] | (Py_ssize_t)p[1] << 8 | (Py_ssize_t)p[2] << 16;
    if (len == 0 || len >= MAX_PAYLOAD || len + 4 != n || p[4] == 0xFF)
        return 0;
    if ((p[4] == 0x00 && len >= 7) || (p[4] == 0xFE && len == 5)) {
        long st = terminator(p, 4, len);
        if (st >= 0)  /* (a malformed OK leaves it, as the tracker does) */
            status = st;
    }
    *status_out = status;
    *packets_out = 1;
    return 1;
}

PyObject *
hotpath_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *p;
    Py_ssize_t n;
    int took = chunk_of(args, nargs, "response(session, data)", &p, &n);
    if (took <= 0)
        return took < 0 ? NULL : Py_NewRef(Py_False);
    PyObject *s = args[0], *data = args[1];
    if (n < 5 || p[4] == 0xFF)  /* an error: what to do with it is the Python path's */
        Py_RETURN_FALSE;

    PyObject *d = NULL, *tracker = NULL, *obj = NULL, *counts = NULL, *result = NULL;
    int r;
    if ((d = PyObject_GenericGetDict(s, NULL)) == NULL)
        goto fail;
    if ((r = session_is_plain(d, s, 1)) <= 0)
        goto refuse;
    if ((tracker = tracker_of(d, s)) == NULL)
        goto fail;
    if (tracker == Py_None) {
        tracker = NULL;
        goto refuse_ok;
    }
    long tphase, skip, binary, status, packets_before;
    if (slot_long(tracker, tracker_at[T_PHASE], &tphase) < 0
        || slot_long(tracker, tracker_at[T_SKIP], &skip) < 0)
        goto fail;
    PyObject *pending = SLOT(tracker, tracker_at[T_PENDING]);
    if ((tphase != TRACKER_FIRST && tphase != TRACKER_SINGLE) || skip)
        goto refuse_ok;
    int continued = PyObject_IsTrue(SLOT(tracker, tracker_at[T_CONTINUED]));
    Py_ssize_t carried = PyObject_Size(SLOT(tracker, tracker_at[T_CARRY]));
    Py_ssize_t waiting = PyObject_Size(pending);
    if (continued < 0 || carried < 0 || waiting < 0)
        goto fail;
    if (continued || carried || waiting != 1)
        goto refuse_ok;
    obj = PySequence_GetItem(pending, 0);
    if (obj == NULL)
        goto fail;
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2
        || !PyLong_CheckExact(PyTuple_GET_ITEM(obj, 1)))
        goto refuse_ok;  /* a token to record: Session._record's */
    Py_CLEAR(obj);
    int deprecate_eof = PyObject_IsTrue(SLOT(tracker, tracker_at[T_DEPRECATE_EOF]));
    if (deprecate_eof < 0 || slot_long(tracker, tracker_at[T_BINARY], &binary) < 0
        || slot_long(tracker, tracker_at[T_STATUS], &status) < 0
        || slot_long(tracker, tracker_at[T_PACKETS], &packets_before) < 0)
        goto fail;
    Py_ssize_t end, packets;
    long status_after;
    int error;
    if (tphase == TRACKER_SINGLE) {
        if (!scan_single(p, n, status, &status_after, &packets))
            goto refuse_ok;
    } else if (!scan_whole(p, n, 0, deprecate_eof, binary, status, &end, &status_after, &error,
                           &packets) || end != n || error) {
        goto refuse_ok;
    }
    if ((counts = counts_of(d, s)) == NULL)
        goto fail;

    /* It is the whole answer. */
    if (PyDict_SetItem(d, s_inflight, Py_None) < 0)
        goto fail;
    if (send_on(d, s, s_client, data) < 0)
        goto fail;
    if (slot_add(counts, counts_at[C_IN_BYTES], n) < 0 || count_cross(d, s, n) < 0)
        goto fail;
    /* ResponseTracker._finish, for its one pending response */
    if (slot_set_long(tracker, tracker_at[T_STATUS], status_after) < 0)
        goto fail;
    slot_set(tracker, tracker_at[T_LOCAL_INFILE], Py_False);
    if ((obj = PyObject_CallMethodNoArgs(pending, s_popleft)) == NULL)
        goto fail;
    Py_CLEAR(obj);
    if (slot_set_long(tracker, tracker_at[T_PHASE], TRACKER_IDLE) < 0)
        goto fail;
    if (response_done(d, s, counts, monotonic()) < 0)
        goto fail;
    /* traffic.in_packets += tracker.packets; tracker.packets = 0 */
    if (slot_add(counts, counts_at[C_IN_PACKETS], packets_before + packets) < 0)
        goto fail;
    if (packets_before && slot_set_long(tracker, tracker_at[T_PACKETS], 0) < 0)
        goto fail;
    result = Py_True;
    goto done;
refuse_ok:
    r = 0;
refuse:
    if (r < 0)
        goto fail;
    result = Py_False;
    goto done;
fail:
    result = NULL;
done:
    Py_XDECREF(d);
    Py_XDECREF(tracker);
    Py_XDECREF(obj);
    Py_XDECREF(counts);
    Py_XINCREF(result);
    return result;
}

/* A 256-entry table from an iterable of ints (byte values). */
static int
byte_table(PyObject *bytes_set, unsigned char *table)
{
    memset(table, 0, 256);
    PyObject *it = PyObject_GetIter(bytes_set);
    if (it == NULL)
        return -1;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        long b = PyLong_AsLong(item);
        Py_DECREF(item);
        if (b < 0 || b > 255) {
            Py_DECREF(it);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a byte value");
            return -1;
        }
        table[b] = 1;
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
}

/* Where each named slot of `cls` (a class with __slots__) keeps its value. */
static int
slot_offsets(PyObject *cls, const char **names, int count, Py_ssize_t *at)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "configure: a class");
        return -1;
    }
    for (int i = 0; i < count; i++) {
        PyObject *descr = PyObject_GetAttrString(cls, names[i]);
        if (descr == NULL)
            return -1;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            at[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "configure: %s is not a slot", names[i]);
            return -1;
        }
    }
    return 0;
}

/*
 * configure(command_phase, plans, state_first_bytes, letters, state_prefixes,
 *           compound_first_bytes, compound_match, ResponseTracker, BackendCounts, Histogram)
 * plans: {command byte: (Expect, tracker _binary, tracker first phase)} for the commands that
 * may go untouched. The three classes are read and written through their slots.
 */
static PyObject *
configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "configure(command_phase, plans, state_first_bytes, "
                        "letters, state_prefixes, compound_first_bytes, compound_match, "
                        "ResponseTracker, BackendCounts, Histogram)");
        return NULL;
    }
    if (slot_offsets(args[7], tracker_fields, T_COUNT, tracker_at) < 0
        || slot_offsets(args[8], counts_fields, C_COUNT, counts_at) < 0
        || slot_offsets(args[9], histogram_fields, H_COUNT, histogram_at) < 0)
        return NULL;
    long phase = PyLong_AsLong(args[0]);
    if (phase == -1 && PyErr_Occurred())
        return NULL;
    if (!PyDict_Check(args[1]) || !PyFrozenSet_Check(args[4]) || !PyCallable_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "configure: plans is a dict, state_prefixes a "
                        "frozenset, compound_match a callable");
        return NULL;
    }
    PyObject *kinds[256] = {NULL};
    long binary[256] = {0}, first[256] = {0};
    PyObject *key, *value;
    Py_ssize_t at = 0;
    while (PyDict_Next(args[1], &at, &key, &value)) {
        long cmd = PyLong_AsLong(key);
        if (cmd < 0 || cmd > 255 || !PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 3) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "configure: a plan is (Expect, int, int)");
            return NULL;
        }
        kinds[cmd] = PyTuple_GET_ITEM(value, 0);
        binary[cmd] = PyLong_AsLong(PyTuple_GET_ITEM(value, 1));
        first[cmd] = PyLong_AsLong(PyTuple_GET_ITEM(value, 2));
        if (PyErr_Occurred())
            return NULL;
    }
    if (byte_table(args[2], state_first) < 0 || byte_table(args[3], letters) < 0
        || byte_table(args[5], compound_first) < 0)
        return NULL;
    for (int i = 0; i < 256; i++) {
        Py_XINCREF(kinds[i]);
        Py_XSETREF(plan_kind[i], kinds[i]);
        plan_binary[i] = binary[i];
        plan_phase[i] = first[i];
    }
    Py_INCREF(args[4]);
    Py_XSETREF(state_prefixes, args[4]);
    Py_INCREF(args[6]);
    Py_XSETREF(compound_match, args[6]);
    for (int i = 7; i < 10; i++)
        Py_INCREF(args[i]);
    Py_XSETREF(tracker_type, (PyTypeObject *)args[7]);
    Py_XSETREF(counts_type, (PyTypeObject *)args[8]);
    Py_XSETREF(histogram_type, (PyTypeObject *)args[9]);
    phase_command = phase;
    configured = 1;
    Py_RETURN_NONE;
}

/*
 * Feed(fast, session, fallback): what an event loop calls with each chunk a socket read, as
 * a protocol's data_received: `fast(session, data)` (command or response, above), and when
 * that returns False, `fallback(data)` (the session's Python method). No Python frame runs
 * for a chunk the compiled path takes.
 */
typedef struct {
    PyObject_HEAD
    PyObject *session;
    PyObject *fallback;
    int is_response;
    unsigned int streak;  /* answers in a row that the compiled path took (is_response) */
    vectorcallfunc vectorcall;
} Feed;

/* Every this many answers in a row the compiled path takes, a backend Feed offers the session
 * to direct reading (net/_direct.c): session._direct_enter() says whether it goes. */
#define DIRECT_AFTER 8
static PyObject *s_direct_enter;

static PyObject *
feed_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Feed *feed = (Feed *)self;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "Feed(data)");
        return NULL;
    }
    PyObject *both[2] = {feed->session, args[0]};
    PyObject *took = feed->is_response ? hotpath_response(NULL, both, 2)
                                       : hotpath_command(NULL, both, 2);
    if (took == NULL)
        return NULL;
    Py_DECREF(took);
    if (took == Py_True) {
        if (feed->is_response && ++feed->streak % DIRECT_AFTER == 0)
            return PyObject_CallMethodNoArgs(feed->session, s_direct_enter);
        Py_RETURN_NONE;
    }
    feed->streak = 0;
    return PyObject_CallOneArg(feed->fallback, args[0]);
}

static PyObject *
feed_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *fast, *session, *fallback;
    if (!PyArg_ParseTuple(args, "OOO:Feed", &fast, &session, &fallback))
        return NULL;
    int is_response = PyCFunction_Check(fast) && PyCFunction_GET_FUNCTION(fast)
                      == (PyCFunction)(void (*)(void))hotpath_response;
    int is_command = PyCFunction_Check(fast) && PyCFunction_GET_FUNCTION(fast)
                     == (PyCFunction)(void (*)(void))hotpath_command;
    if (!is_response && !is_command) {
        PyErr_SetString(PyExc_TypeError, "Feed: fast is this module's command or response");
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "Feed: fallback is callable");
        return NULL;
    }
    Feed *feed = (Feed *)type->tp_alloc(type, 0);
    if (feed == NULL)
        return NULL;
    Py_INCREF(session);
    feed->session = session;
    Py_INCREF(fallback);
    feed->fallback = fallback;
    feed->is_response = is_response;
    feed->vectorcall = feed_call;
    return (PyObject *)feed;
}

static int
feed_traverse(Feed *feed, visitproc visit, void *arg)
{
    Py_VISIT(feed->session);
    Py_VISIT(feed->fallback);
    return 0;
}

static int
feed_clear(Feed *feed)
{
    Py_CLEAR(feed->session);
    Py_CLEAR(feed->fallback);
    return 0;
}

static void
feed_dealloc(Feed *feed)
{
    PyObject_GC_UnTrack(feed);
    feed_clear(feed);
    Py_TYPE(feed)->tp_free((PyObject *)feed);
}

static PyTypeObject FeedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tiproxy.net._hotpath.Feed",
    .tp_doc = "Feed(fast, session, fallback): a data_received that tries the compiled path.",
    .tp_basicsize = sizeof(Feed),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = feed_new,
    .tp_traverse = (traverseproc)feed_traverse,
    .tp_clear = (inquiry)feed_clear,
    .tp_dealloc = (destructor)feed_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Feed, vectorcall),
};

/* setsockopts(fd, options): setsockopt(fd, level, name, value) for each (level, name, value)
 * of `options`, a tuple of int triples; raises OSError at the first that fails. What
 * net/keepalive.py does per backend connection, without a Python socket object and a method
 * call per option. */
static int
as_int(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "socket option value out of range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

static PyObject *
setsockopts(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setsockopts(fd, options: tuple)");
        return NULL;
    }
    int fd;
    if (as_int(args[0], &fd) < 0)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(args[1]);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *option = PyTuple_GET_ITEM(args[1], i);
        if (!PyTuple_Check(option) || PyTuple_GET_SIZE(option) != 3) {
            PyErr_SetString(PyExc_TypeError, "each option is (level, name, value)");
            return NULL;
        }
        int level, name, value;
        if (as_int(PyTuple_GET_ITEM(option, 0), &level) < 0
                || as_int(PyTuple_GET_ITEM(option, 1), &name) < 0
                || as_int(PyTuple_GET_ITEM(option, 2), &value) < 0)
            return NULL;
        if (setsockopt(fd, level, name, &value, sizeof value) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"command", (PyCFunction)(void (*)(void))hotpath_command, METH_FASTCALL,
     "Relay one plain command packet from the client; False if the Python path must."},
    {"response", (PyCFunction)(void (*)(void))hotpath_response, METH_FASTCALL,
     "Relay one whole plain answer from the backend; False if the Python path must."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "Hand over the tables the two relay functions read."},
    {"setsockopts", (PyCFunction)(void (*)(void))setsockopts, METH_FASTCALL,
     "setsockopt(fd, level, name, value) for each (level, name, value) of a tuple."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hotpath", "The relay's per-query path, compiled.", -1, methods,
};

PyMODINIT_FUNC
PyInit__hotpath(void)
{
    if (intern_names() < 0)
        return NULL;
    if (PyType_Ready(&FeedType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FeedType);
    if (PyModule_AddObject(m, "Feed", (PyObject *)&FeedType) < 0) {
        Py_DECREF(&FeedType);
        Py_DECREF(m);
        return NULL;
    }
    if ((s_direct_enter = PyUnicode_InternFromString("_direct_enter")) == NULL
            || direct_add_type(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *phases = Py_BuildValue("(iii)", TRACKER_IDLE, TRACKER_FIRST, TRACKER_SINGLE);
    if (phases == NULL || PyModule_AddObject(m, "TRACKER_PHASES", phases) < 0) {
        Py_XDECREF(phases);
        Py_DECREF(m);
        return NULL;
    }
    /* The attributes read from (and written to) the objects' own dicts, by class: relay.py
     * checks that no class has a descriptor of these names, which the dict would bypass. */
    PyObject *fields = Py_BuildValue(
        "{s(ssssssssssssssssssssssssssss)s(sss)s(sssssssss)}",
        "Session", "phase", "_decompress", "_capture", "_move", "_held", "replay_limit",
        "_intercept", "held_answer", "_rewriter", "_cbuf", "_ccont", "stale",
        "lost_transaction", "leaving", "_cross", "server", "tracker", "state", "inflight",
        "last_command", "bt", "_traffic", "_sent", "client", "last_answer", "_opened", "_ages",
        "_multi",
        "SessionState", "stmts", "to_client", "table_locks",
        "PreparedStatement", "params", "param_types", "types_sent", "long_data", "cursor_open",
        "renames", "effects", "variables", "kill");
    if (fields == NULL || PyModule_AddObject(m, "DICT_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
