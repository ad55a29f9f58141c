/*
 * hindsight_py._speedups: the per-message loops of the hot path, in C.
 *
 * Optional. pip builds it when a C compiler is at hand; without it (or with
 * HINDSIGHT_PY_PURE=1) the Python code these loops come from runs instead (message.py's
 * scan_records and encode_payloads, plugins/elasticsearch_bulk.py's payload cutting), and
 * tests/test_speedups.py checks that both give identical results on fuzzed input.
 *
 * Each function does exactly what its Python twin does and nothing more: anything
 * unusual (a frame of another shape, a message whose bytes differ from the learned
 * shape) is left for the Python code, which stays the one place that handles it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* scan_quick(buf, pos, end, max_message_size, records, ends, base, max_records, max_bytes)
 *   -> (pos, count, nbytes)
 *
 * Appends the records of the frames every writer makes for messages of 128 B to 2 MB:
 * 0x1E, H = 3 or 4, 0x08, a 2- or 3-byte length varint, 0x1F. Stops at the first frame
 * of any other form, at a frame cut off by `end` (or within 7 bytes of it), at one
 * longer than max_message_size, or after max_records / max_bytes. No validation: the
 * caller uses it only for queues hindsight-py wrote itself. */
static PyObject *
scan_quick(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, end, max_size, base, max_records, max_bytes;
    PyObject *records, *ends;
    if (!PyArg_ParseTuple(args, "y*nnnO!O!nnn", &view, &pos, &end, &max_size, &PyList_Type, &records,
                          &PyList_Type, &ends, &base, &max_records, &max_bytes))
        return NULL;
    const unsigned char *buf = view.buf;
    if (end > view.len)
        end = view.len;
    Py_ssize_t limit = end - 7, count = 0, nbytes = 0;
    while (pos >= 0 && pos < limit && buf[pos] == 0x1E && buf[pos + 2] == 0x08) {
        unsigned h = buf[pos + 1], b0 = buf[pos + 3], b1 = buf[pos + 4];
        Py_ssize_t hend, mend;
        if (h == 3 && buf[pos + 5] == 0x1F && b0 >= 0x80 && b1 > 0 && b1 < 0x80) {
            hend = pos + 6;
            mend = hend + ((b0 & 0x7F) | (b1 << 7));
        } else if (h == 4 && buf[pos + 6] == 0x1F && b0 >= 0x80 && b1 >= 0x80 && buf[pos + 5] > 0 &&
                   buf[pos + 5] < 0x80) {
            hend = pos + 7;
            mend = hend + ((b0 & 0x7F) | ((b1 & 0x7F) << 7) | ((Py_ssize_t)buf[pos + 5] << 14));
        } else {
            break;
        }
        if (mend > end || mend - hend > max_size)
            break;
        PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + hend, mend - hend);
        PyObject *at = raw ? PyLong_FromSsize_t(base + mend) : NULL;
        if (!at || PyList_Append(records, raw) < 0 || PyList_Append(ends, at) < 0) {
            Py_XDECREF(raw);
            Py_XDECREF(at);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(raw);
        Py_DECREF(at);
        pos = mend;
        count++;
        nbytes += mend - hend;
        if (count >= max_records || nbytes >= max_bytes)
            break;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nnn", pos, count, nbytes);
}

/* -- encode_payloads ------------------------------------------------------------------ */

static int
put_varint(unsigned char *out, unsigned long long v)
{
    int n = 0;
    while (v >= 0x80) {
        out[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (unsigned char)v;
    return n;
}

static int
varint_len(unsigned long long v)
{
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* The bytes a Payload-only message of `len` payload bytes takes, framed. */
static Py_ssize_t
framed_size(Py_ssize_t len, Py_ssize_t fixed)
{
    Py_ssize_t size = fixed + varint_len(len) + len;
    return 4 + varint_len(size) + size; /* 0x1E H 0x08 varint 0x1F, then the message */
}

/* Writes one framed message: 0x0A 0x10 uuid, head, varint(len), payload, tail. */
static unsigned char *
put_message(unsigned char *out, const unsigned char *uuid, const Py_buffer *head, const char *payload,
            Py_ssize_t len, const Py_buffer *tail)
{
    Py_ssize_t size = 18 + head->len + tail->len + varint_len(len) + len;
    *out++ = 0x1E;
    *out++ = (unsigned char)(1 + varint_len(size));
    *out++ = 0x08;
    out += put_varint(out, size);
    *out++ = 0x1F;
    *out++ = 0x0A;
    *out++ = 0x10;
    memcpy(out, uuid, 16);
    out += 16;
    memcpy(out, head->buf, head->len);
    out += head->len;
    out += put_varint(out, len);
    memcpy(out, payload, len);
    out += len;
    memcpy(out, tail->buf, tail->len);
    return out + tail->len;
}

/* frame_payloads(payloads, uuids, head, tail) -> bytes
 *
 * For each payload p (and its 16 bytes of `uuids`): the stream frame of the message
 * 0x0A 0x10 uuid, head, varint(len(p)), p, tail. `head` ends with the Payload key;
 * `tail` holds the headers after the Payload. */
static PyObject *
frame_payloads(PyObject *self, PyObject *args)
{
    PyObject *payloads;
    Py_buffer uuids, head, tail;
    if (!PyArg_ParseTuple(args, "O!y*y*y*", &PyList_Type, &payloads, &uuids, &head, &tail))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(payloads);
    if (uuids.len < 16 * n) {
        PyErr_SetString(PyExc_ValueError, "frame_payloads: not enough uuid bytes");
        goto done;
    }
    Py_ssize_t fixed = 18 + head.len + tail.len, total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(p)) {
            PyErr_Format(PyExc_TypeError, "payload %zd is not bytes", i);
            goto done;
        }
        total += framed_size(PyBytes_GET_SIZE(p), fixed);
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (!result)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *u = uuids.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(payloads, i);
        out = put_message(out, u + 16 * i, &head, PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p), &tail);
    }
done:
    PyBuffer_Release(&uuids);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

/* -- lines of a text block ------------------------------------------------------------- */

/* The end of the line that starts at p (its b"\n", or `end` for a last line without one). */
static Py_ssize_t
line_end(const char *buf, Py_ssize_t p, Py_ssize_t end)
{
    const char *nl = memchr(buf + p, '\n', end - p);
    return nl ? nl - buf : end;
}

/* count_lines(data, start, end, max_len) -> (count, stop)
 *
 * The lines of data[start:end] (split at b"\n"; a last piece without one is a line too),
 * up to the first one longer than max_len: their number, and where that long line starts
 * (`end` when there is none). */
static PyObject *
count_lines(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end, max_len, count = 0;
    if (!PyArg_ParseTuple(args, "y*nnn", &view, &start, &end, &max_len))
        return NULL;
    if (end > view.len)
        end = view.len;
    Py_ssize_t p = start < 0 ? 0 : start;
    while (p < end) {
        Py_ssize_t e = line_end(view.buf, p, end);
        if (e - p > max_len)
            break;
        count++;
        p = e + 1;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nn", count, p < end ? p : end);
}

/* frame_lines(data, start, end, uuids, head, tail) -> bytes
 *
 * frame_payloads() of the lines of data[start:end], without making them objects first. */
static PyObject *
frame_lines(PyObject *self, PyObject *args)
{
    Py_buffer view, uuids, head, tail;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*nny*y*y*", &view, &start, &end, &uuids, &head, &tail))
        return NULL;
    PyObject *result = NULL;
    const char *buf = view.buf;
    if (end > view.len)
        end = view.len;
    if (start < 0)
        start = 0;
    Py_ssize_t fixed = 18 + head.len + tail.len, total = 0, n = 0;
    for (Py_ssize_t p = start; p < end; n++) {
        Py_ssize_t e = line_end(buf, p, end);
        total += framed_size(e - p, fixed);
        p = e + 1;
    }
    if (uuids.len < 16 * n) {
        PyErr_SetString(PyExc_ValueError, "frame_lines: not enough uuid bytes");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (!result)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *u = uuids.buf;
    for (Py_ssize_t p = start; p < end; u += 16) {
        Py_ssize_t e = line_end(buf, p, end);
        out = put_message(out, u, &head, buf + p, e - p, &tail);
        p = e + 1;
    }
done:
    PyBuffer_Release(&view);
    PyBuffer_Release(&uuids);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

/* -- cut_payloads --------------------------------------------------------------------- */

/* cut_payloads(raws, middle, length_at, tail) -> list of bytes or None
 *
 * The Payload of each message shaped like the one the shape was learned from: Uuid,
 * a 9-byte Timestamp, then `middle` (ending with the Payload key) at byte 28, a 1- or
 * 2-byte length at `length_at`, the payload, and `tail` to the end. None for any other
 * message: the caller walks those in full. */
static PyObject *
cut_payloads(PyObject *self, PyObject *args)
{
    PyObject *raws;
    Py_buffer middle, tail;
    Py_ssize_t length_at;
    if (!PyArg_ParseTuple(args, "O!y*ny*", &PyList_Type, &raws, &middle, &length_at, &tail))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(raws);
    PyObject *out = PyList_New(n);
    if (!out)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(raws, i), *payload = NULL;
        if (PyBytes_Check(item) && length_at >= 28 + middle.len) {
            const unsigned char *r = (const unsigned char *)PyBytes_AS_STRING(item);
            Py_ssize_t len = PyBytes_GET_SIZE(item);
            int ok = len > length_at + 1 && r[0] == 0x0A && r[1] == 0x10 && r[18] == 0x10 && r[27] < 0x80 &&
                     memcmp(r + 28, middle.buf, middle.len) == 0;
            for (int k = 19; ok && k < 27; k++)
                ok = r[k] >= 0x80;
            if (ok) {
                Py_ssize_t pos = length_at, plen = r[pos];
                if (plen < 0x80) {
                    pos += 1;
                } else if (r[pos + 1] < 0x80) {
                    plen = (plen & 0x7F) | ((Py_ssize_t)r[pos + 1] << 7);
                    pos += 2;
                } else {
                    ok = 0;
                }
                Py_ssize_t pend = pos + plen;
                if (ok && len - pend == tail.len && memcmp(r + pend, tail.buf, tail.len) == 0) {
                    payload = PyBytes_FromStringAndSize((const char *)r + pos, plen);
                    if (!payload) {
                        Py_CLEAR(out);
                        goto done;
                    }
                }
            }
        }
        if (!payload)
            payload = Py_NewRef(Py_None);
        PyList_SET_ITEM(out, i, payload);
    }
done:
    PyBuffer_Release(&middle);
    PyBuffer_Release(&tail);
    return out;
}

/* one_line_objects(payloads) -> bool: every item is bytes that starts with "{" and
 * holds no line feed, so it can go into a bulk body as it is. */
static PyObject *
one_line_objects(PyObject *self, PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "one_line_objects: a list is needed");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(arg, i);
        if (!PyBytes_Check(p))
            Py_RETURN_FALSE;
        Py_ssize_t len = PyBytes_GET_SIZE(p);
        const char *s = PyBytes_AS_STRING(p);
        if (len == 0 || s[0] != '{' || memchr(s, '\n', len) != NULL)
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* every_line_is_an_object(body) -> bool: the body starts with "{" and so does every line
 * after a b"\n" (a b"\n" at the very end starts no line). */
static PyObject *
every_line_is_an_object(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *s = view.buf, *end = s + view.len;
    int ok = view.len > 0 && s[0] == '{';
    for (const char *p = s; ok && (p = memchr(p, '\n', end - p)) != NULL && p + 1 < end; p++)
        ok = p[1] == '{';
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"scan_quick", scan_quick, METH_VARARGS, "The common frames of a trusted queue buffer (see the C source)."},
    {"frame_payloads", frame_payloads, METH_VARARGS, "Framed Payload-only messages (see the C source)."},
    {"count_lines", count_lines, METH_VARARGS, "Lines of a block up to the first too long (see the C source)."},
    {"frame_lines", frame_lines, METH_VARARGS, "Framed Payload-only messages, one per line (see the C source)."},
    {"cut_payloads", cut_payloads, METH_VARARGS, "Payloads of messages of one learned shape (see the C source)."},
    {"every_line_is_an_object", every_line_is_an_object, METH_O, "Every line of a bulk body starts with '{'."},
    {"one_line_objects", one_line_objects, METH_O, "Every payload starts with '{' and has no line feed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hindsight_py._speedups", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
