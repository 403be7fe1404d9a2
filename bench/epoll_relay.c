/* The yardstick under bench/bare_relay.py --epoll: established connection pairs relayed by C
 * from an epoll set of its own, which the event loop watches as one descriptor (add_reader).
 * Per chunk: one recv and one send, no transport, no bytes object, no Python call but the
 * loop's one per wake-up. Not a proxy: no parsing, no TLS; a send that would block waits in
 * poll() (answers here are small, and the measure is the common case). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 65536

typedef struct {
    PyObject_HEAD
    int epoll;
    int peer[MAX_FD];
} Relay;

static char chunk[1 << 16];

static int Relay_init(Relay *self, PyObject *args, PyObject *kwargs) {
    self->epoll = epoll_create1(EPOLL_CLOEXEC);
    if (self->epoll < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Relay_fileno(Relay *self, PyObject *unused) {
    return PyLong_FromLong(self->epoll);
}

static void drop(Relay *self, int fd) {
    int other = self->peer[fd];
    epoll_ctl(self->epoll, EPOLL_CTL_DEL, fd, NULL);
    epoll_ctl(self->epoll, EPOLL_CTL_DEL, other, NULL);
    close(fd);
    close(other);
}

/* add(client_fd, backend_fd): the relay owns both descriptors from now on. */
static PyObject *Relay_add(Relay *self, PyObject *args) {
    int a, b;
    if (!PyArg_ParseTuple(args, "ii", &a, &b))
        return NULL;
    if (a < 0 || b < 0 || a >= MAX_FD || b >= MAX_FD) {
        PyErr_SetString(PyExc_ValueError, "descriptor out of range");
        return NULL;
    }
    self->peer[a] = b;
    self->peer[b] = a;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = a;
    if (epoll_ctl(self->epoll, EPOLL_CTL_ADD, a, &ev) == 0) {
        ev.data.fd = b;
        if (epoll_ctl(self->epoll, EPOLL_CTL_ADD, b, &ev) == 0)
            Py_RETURN_NONE;
    }
    PyErr_SetFromErrno(PyExc_OSError);
    drop(self, a);
    return NULL;
}

static int send_all(int fd, const char *data, ssize_t size) {
    while (size > 0) {
        ssize_t sent = send(fd, data, (size_t)size, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return -1;
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            poll(&p, 1, -1);
            continue;
        }
        data += sent;
        size -= sent;
    }
    return 0;
}

/* The loop calls this when the epoll set has events: relay what is ready, without waiting. */
static PyObject *Relay_run(Relay *self, PyObject *unused) {
    struct epoll_event events[64];
    int n = epoll_wait(self->epoll, events, 64, 0);
    for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        ssize_t got = recv(fd, chunk, sizeof chunk, 0);
        if (got < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (got <= 0 || send_all(self->peer[fd], chunk, got) < 0)
            drop(self, fd);
    }
    Py_RETURN_NONE;
}

static PyMethodDef Relay_methods[] = {
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "the epoll descriptor to watch"},
    {"add", (PyCFunction)Relay_add, METH_VARARGS, "relay a (client, backend) pair of fds"},
    {"run", (PyCFunction)Relay_run, METH_NOARGS, "relay whatever is ready"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "epoll_relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Relay_init,
    .tp_methods = Relay_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "epoll_relay", NULL, -1, NULL};

PyMODINIT_FUNC PyInit_epoll_relay(void) {
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
