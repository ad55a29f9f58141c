/*
 * hindsight_py._speedups: the per-message loops of the hot path, in C.
 *
 * Optional. pip builds it when a C compiler is at hand; without it (or with
 * HINDSIGHT_PY_PURE=1) the Python code these loops come from runs instead (framing.py's
 * scan_records and encode_payloads, peek.py's payload cutting and header selection), and
 * tests/test_speedups.py checks that both give identical results on fuzzed input.
 *
 * Each function does exactly what its Python twin does and nothing more: anything
 * unusual (a frame of another shape, a message whose bytes differ from the learned
 * shape) is left for the Python code, which stays the one place that handles it.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* memmem */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__))
#include <emmintrin.h>
#define JR_SSE2 1
#endif

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

/* The bytes of a one-string Field whose name (with its keys: 0x0A varint(len) name 0x22) takes
 * `nlen` bytes and whose value takes `vlen`, framed as a message field (0x52 varint(size) ...). */
static Py_ssize_t
field_size(Py_ssize_t nlen, Py_ssize_t vlen)
{
    Py_ssize_t inner = nlen + varint_len(vlen) + vlen;
    return 1 + varint_len(inner) + inner;
}

/* Writes such a Field. */
static unsigned char *
put_field(unsigned char *out, const void *name, Py_ssize_t nlen, const void *value, Py_ssize_t vlen)
{
    *out++ = 0x52;
    out += put_varint(out, nlen + varint_len(vlen) + vlen);
    memcpy(out, name, nlen);
    out += nlen;
    out += put_varint(out, vlen);
    memcpy(out, value, vlen);
    return out + vlen;
}

/* Writes the frame of a `size`-byte message, its Uuid, its Timestamp, `head` (ending with the
 * Payload key) and the payload's length: what comes before the payload. */
static unsigned char *
put_stamped_head(unsigned char *out, Py_ssize_t size, const unsigned char *uuid, unsigned long long ts,
                 const Py_buffer *head, Py_ssize_t plen)
{
    *out++ = 0x1E;
    *out++ = (unsigned char)(1 + varint_len(size));
    *out++ = 0x08;
    out += put_varint(out, size);
    *out++ = 0x1F;
    *out++ = 0x0A;
    *out++ = 0x10;
    memcpy(out, uuid, 16);
    out += 16;
    *out++ = 0x10;
    out += put_varint(out, ts);
    memcpy(out, head->buf, head->len);
    out += head->len;
    return out + put_varint(out, plen);
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

/* Whether a payload can go into a bulk body as it is: it starts with "{" and holds no line feed. */
static int
is_one_line_object(const char *s, Py_ssize_t len)
{
    return len > 0 && s[0] == '{' && memchr(s, '\n', len) == NULL;
}

/* one_line_objects(payloads) -> bool: every item is bytes that is_one_line_object. */
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
        if (!is_one_line_object(PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p)))
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

/* -- frame_records ---------------------------------------------------------------------- */

/* The size of message i of frame_records (its str values already encoded, which caches them). */
static Py_ssize_t
record_size(Py_ssize_t plen, unsigned long long ts, const Py_buffer *head, const Py_buffer *tail, PyObject *names,
            PyObject *columns, Py_ssize_t i)
{
    Py_ssize_t size = 18 + 1 + varint_len(ts) + head->len + varint_len(plen) + plen + tail->len;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(names); k++) {
        PyObject *v = PyList_GET_ITEM(PyList_GET_ITEM(columns, k), i);
        Py_ssize_t vlen;
        if (v != Py_None && PyUnicode_AsUTF8AndSize(v, &vlen))
            size += field_size(PyBytes_GET_SIZE(PyList_GET_ITEM(names, k)), vlen);
    }
    return size;
}

/* frame_records(payloads, stamps, uuids, head, tail, names, columns) -> bytes
 *
 * The stream frames of messages with their own Timestamp and string Fields:
 * 0x0A 0x10 uuid, 0x10 varint(stamp), head, varint(len(p)), p, tail, then for each column k
 * whose value v is not None: 0x52 varint(size), names[k], varint(len(v)), v (UTF-8). `head`
 * ends with the Payload key, `names[k]` is the field's 0x0A varint(len) name 0x22. A value
 * that is not a str (or does not encode to UTF-8) raises: the Python twin handles those. */
static PyObject *
frame_records(PyObject *self, PyObject *args)
{
    PyObject *payloads, *stamps, *names, *columns;
    Py_buffer uuids, head, tail;
    if (!PyArg_ParseTuple(args, "O!O!y*y*y*O!O!", &PyList_Type, &payloads, &PyList_Type, &stamps, &uuids, &head,
                          &tail, &PyList_Type, &names, &PyList_Type, &columns))
        return NULL;
    PyObject *result = NULL;
    unsigned long long *ts = NULL;
    Py_ssize_t n = PyList_GET_SIZE(payloads), nf = PyList_GET_SIZE(names);
    if (uuids.len < 16 * n || PyList_GET_SIZE(stamps) != n || PyList_GET_SIZE(columns) != nf) {
        PyErr_SetString(PyExc_ValueError, "frame_records: lengths differ");
        goto done;
    }
    for (Py_ssize_t k = 0; k < nf; k++) {
        PyObject *col = PyList_GET_ITEM(columns, k);
        if (!PyBytes_Check(PyList_GET_ITEM(names, k)) || !PyList_Check(col) || PyList_GET_SIZE(col) != n) {
            PyErr_SetString(PyExc_TypeError, "frame_records: names must be bytes, columns lists of n values");
            goto done;
        }
    }
    ts = PyMem_Malloc(sizeof(*ts) * (n ? n : 1));
    if (!ts) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(p)) {
            PyErr_Format(PyExc_TypeError, "payload %zd is not bytes", i);
            goto done;
        }
        long long t = PyLong_AsLongLong(PyList_GET_ITEM(stamps, i));
        if (t == -1 && PyErr_Occurred())
            goto done;
        ts[i] = (unsigned long long)t;
        for (Py_ssize_t k = 0; k < nf; k++) {
            PyObject *v = PyList_GET_ITEM(PyList_GET_ITEM(columns, k), i);
            if (v != Py_None && !PyUnicode_Check(v)) {
                PyErr_Format(PyExc_TypeError, "field value %zd is not a str", i);
                goto done;
            }
            if (v != Py_None && !PyUnicode_AsUTF8AndSize(v, NULL))
                goto done; /* cached for record_size() */
        }
        Py_ssize_t size = record_size(PyBytes_GET_SIZE(p), ts[i], &head, &tail, names, columns, i);
        total += 4 + varint_len(size) + size;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (!result)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *u = uuids.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(payloads, i);
        Py_ssize_t plen = PyBytes_GET_SIZE(p);
        Py_ssize_t size = record_size(plen, ts[i], &head, &tail, names, columns, i);
        out = put_stamped_head(out, size, u + 16 * i, ts[i], &head, plen);
        memcpy(out, PyBytes_AS_STRING(p), plen);
        out += plen;
        memcpy(out, tail.buf, tail.len);
        out += tail.len;
        for (Py_ssize_t k = 0; k < nf; k++) {
            PyObject *v = PyList_GET_ITEM(PyList_GET_ITEM(columns, k), i), *name = PyList_GET_ITEM(names, k);
            if (v == Py_None)
                continue;
            Py_ssize_t vlen;
            const char *value = PyUnicode_AsUTF8AndSize(v, &vlen);
            out = put_field(out, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), value, vlen);
        }
    }
done:
    PyMem_Free(ts);
    PyBuffer_Release(&uuids);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

/* -- walking messages ------------------------------------------------------------------- */

/* A varint at r[*pos] (at most 10 bytes, all before n) into *v; 0 when there is none. */
static int
get_varint(const unsigned char *r, Py_ssize_t n, Py_ssize_t *pos, unsigned long long *v)
{
    unsigned long long x = 0;
    for (int k = 0; k < 10 && *pos < n; k++) {
        unsigned char b = r[(*pos)++];
        x |= (unsigned long long)(b & 0x7F) << (7 * k);
        if (b < 0x80) {
            *v = x;
            return 1;
        }
    }
    return 0;
}

/* Walks the top-level keys of a message as peek.header_of does: the start and length of the
 * last length-delimited value of `tag` (*start = -1: none), and the last varint of tag 2 (the
 * Timestamp) in *stamp (*has_stamp = 0: none). 0 when the framing is malformed. */
static int
walk_message(const unsigned char *r, Py_ssize_t n, unsigned tag, Py_ssize_t *start, Py_ssize_t *len,
             unsigned long long *stamp, int *has_stamp)
{
    Py_ssize_t pos = 0;
    *start = -1;
    *has_stamp = 0;
    while (pos < n) {
        unsigned key = r[pos++];
        unsigned long long v;
        if ((key & 7) == 2) {
            if (!get_varint(r, n, &pos, &v) || v > (unsigned long long)(n - pos))
                return 0;
            if ((key >> 3) == tag) {
                *start = pos;
                *len = (Py_ssize_t)v;
            }
            pos += (Py_ssize_t)v;
        } else if ((key & 7) == 0) {
            if (!get_varint(r, n, &pos, &v))
                return 0;
            if ((key >> 3) == 2) {
                *stamp = v;
                *has_stamp = 1;
            }
        } else {
            return 0;
        }
    }
    return 1;
}

/* header_selection(raws, tag, value) -> list of int
 *
 * For each message: 1 when its last top-level string header `tag` (3 Type, 4 Logger, 7
 * EnvVersion, 9 Hostname) is exactly `value`, 0 when it is another or absent, -1 when its
 * framing cannot be walked (or it has no 16-byte Uuid first): the caller decodes those. */
static PyObject *
header_selection(PyObject *self, PyObject *args)
{
    PyObject *raws;
    unsigned tag;
    Py_buffer value;
    if (!PyArg_ParseTuple(args, "O!Iy*", &PyList_Type, &raws, &tag, &value))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(raws);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *item = PyList_GET_ITEM(raws, i);
        long verdict = -1;
        if (PyBytes_Check(item)) {
            const unsigned char *r = (const unsigned char *)PyBytes_AS_STRING(item);
            Py_ssize_t len = PyBytes_GET_SIZE(item), start, vlen;
            unsigned long long stamp;
            int has_stamp;
            if (len > 18 && r[0] == 0x0A && r[1] == 0x10 &&
                walk_message(r, len, tag, &start, &vlen, &stamp, &has_stamp) && has_stamp)
                verdict = start >= 0 && vlen == value.len && memcmp(r + start, value.buf, vlen) == 0;
        }
        PyObject *v = PyLong_FromLong(verdict);
        if (!v) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, v);
    }
    PyBuffer_Release(&value);
    return out;
}

/* One message's (last) Payload as new bytes in *payload (NULL when it has none) and its Timestamp:
 * 1 when the message walks to its end, 0 when it does not (then nothing is set), -1 on a Python
 * error. The per-message step of payloads_and_stamps and keyed_action_lines. */
static int
payload_and_stamp(PyObject *item, PyObject **payload, unsigned long long *stamp, int *has_stamp)
{
    Py_ssize_t start = -1, len = 0;
    *payload = NULL;
    if (!PyBytes_Check(item) || !walk_message((const unsigned char *)PyBytes_AS_STRING(item),
                                              PyBytes_GET_SIZE(item), 6, &start, &len, stamp, has_stamp)) {
        *has_stamp = 0; /* what the walk found of a message it cannot walk to the end is not used */
        return 0;
    }
    if (start >= 0 && !(*payload = PyBytes_FromStringAndSize(PyBytes_AS_STRING(item) + start, len)))
        return -1;
    return 1;
}

/* payloads_and_stamps(raws) -> (payloads, stamps)
 *
 * For each message: its last Payload, and its last Timestamp as a signed 64-bit int (None when
 * it has none, or its framing is malformed). peek.payloads_and_stamps is the twin. */
static PyObject *
payloads_and_stamps(PyObject *self, PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "payloads_and_stamps: a list is needed");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    PyObject *payloads = PyList_New(n), *stamps = PyList_New(n);
    if (!payloads || !stamps)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p, *t = NULL;
        unsigned long long stamp = 0;
        int has_stamp = 0;
        if (payload_and_stamp(PyList_GET_ITEM(arg, i), &p, &stamp, &has_stamp) < 0)
            goto fail;
        if (has_stamp && !(t = PyLong_FromLongLong((long long)stamp))) {
            Py_XDECREF(p);
            goto fail;
        }
        PyList_SET_ITEM(payloads, i, p ? p : Py_NewRef(Py_None));
        PyList_SET_ITEM(stamps, i, t ? t : Py_NewRef(Py_None));
    }
    return Py_BuildValue("NN", payloads, stamps);
fail:
    Py_XDECREF(payloads);
    Py_XDECREF(stamps);
    return NULL;
}

/* -- bulk bodies straight from messages ------------------------------------------------------ */

/* The Payload of a message when it can go into a bulk body as it is: the message walks, and its
 * (last) Payload is_one_line_object. */
static int
document_of(PyObject *item, const char **doc, Py_ssize_t *len)
{
    if (!PyBytes_Check(item))
        return 0;
    const unsigned char *r = (const unsigned char *)PyBytes_AS_STRING(item);
    Py_ssize_t start, n;
    unsigned long long stamp;
    int has_stamp;
    if (!walk_message(r, PyBytes_GET_SIZE(item), 6, &start, &n, &stamp, &has_stamp) || start < 0 ||
        !is_one_line_object((const char *)r + start, n))
        return 0;
    *doc = (const char *)r + start;
    *len = n;
    return 1;
}

/* message_documents_size(raws) -> int
 *
 * The bytes of the messages' Payloads when each one can go into a bulk body as it is; -1
 * when one cannot (the caller takes those the long way). bulk_body.message_documents_size is
 * the twin. */
static PyObject *
message_documents_size(PyObject *self, PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "message_documents_size: a list is needed");
        return NULL;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(arg); i++) {
        const char *doc;
        Py_ssize_t len;
        if (!document_of(PyList_GET_ITEM(arg, i), &doc, &len))
            return PyLong_FromLong(-1);
        total += len;
    }
    return PyLong_FromSsize_t(total);
}

/* bulk_body_of_messages(raws, start, max_docs, max_bytes, action) -> (body, count)
 *
 * action "\n" payload "\n" for the messages from `start` on: at most max_docs of them and at
 * most max_bytes bytes, but at least one. Every message must have passed
 * message_documents_size (ValueError otherwise). bulk_body.bulk_body_of_messages is the twin. */
static PyObject *
bulk_body_of_messages(PyObject *self, PyObject *args)
{
    PyObject *raws, *body = NULL;
    Py_ssize_t start, max_docs, max_bytes;
    Py_buffer action;
    if (!PyArg_ParseTuple(args, "O!nnny*", &PyList_Type, &raws, &start, &max_docs, &max_bytes, &action))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(raws), end = start, size = 0;
    if (start < 0 || start >= n || max_docs < 1) {
        PyErr_SetString(PyExc_ValueError, "bulk_body_of_messages: no message to take");
        goto done;
    }
    for (; end < n && end - start < max_docs; end++) {
        const char *doc;
        Py_ssize_t len;
        if (!document_of(PyList_GET_ITEM(raws, end), &doc, &len)) {
            PyErr_SetString(PyExc_ValueError, "bulk_body_of_messages: a message whose Payload is no document");
            goto done;
        }
        Py_ssize_t more = action.len + len + 2;
        if (end > start && size + more > max_bytes)
            break;
        size += more;
    }
    body = PyBytes_FromStringAndSize(NULL, size);
    if (!body)
        goto done;
    char *o = PyBytes_AS_STRING(body);
    for (Py_ssize_t i = start; i < end; i++) {
        const char *doc;
        Py_ssize_t len;
        document_of(PyList_GET_ITEM(raws, i), &doc, &len);
        memcpy(o, action.buf, action.len);
        o += action.len;
        *o++ = '\n';
        memcpy(o, doc, len);
        o += len;
        *o++ = '\n';
    }
done:
    PyBuffer_Release(&action);
    return body ? Py_BuildValue("Nn", body, end - start) : NULL;
}

/* -- bulk action lines ---------------------------------------------------------------------- */

/* The first place of the m-byte key in the n bytes at s, as memmem finds it. With SSE2, 16 places
 * a step are tested on two of the key's bytes (for "<name>":" the name's first and last: rarer
 * than its quotes), and only those that have both are compared whole. */
static const char *
find_key(const char *s, Py_ssize_t n, const char *k, Py_ssize_t m)
{
    Py_ssize_t p = 0;
#ifdef JR_SSE2
    if (m >= 2) {
        Py_ssize_t i = m >= 5 ? 1 : 0, j = m >= 5 ? m - 4 : m - 1;
        const __m128i first = _mm_set1_epi8(k[i]), last = _mm_set1_epi8(k[j]);
        for (; p + j + 16 <= n; p += 16) {
            __m128i x = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + p + i)), first);
            __m128i y = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + p + j)), last);
            unsigned mask = (unsigned)_mm_movemask_epi8(_mm_and_si128(x, y));
            while (mask) {
                Py_ssize_t at = p + __builtin_ctz(mask);
                if (at + m <= n && memcmp(s + at, k, m) == 0)
                    return s + at;
                mask &= mask - 1;
            }
        }
    }
#endif
    return p < n ? memmem(s + p, n - p, k, m) : NULL;
}

/* The `_id` value of a payload for id_action_lines: after the key's only occurrence, printable
 * ASCII without '"' or '\\' up to a closing '"'. 1 and [*v, *e), or 0. */
static int
plain_id(const char *s, Py_ssize_t len, const Py_buffer *key, const char **v, const char **e)
{
    const char *at = len >= key->len ? find_key(s, len, key->buf, key->len) : NULL;
    if (!at || find_key(at + 1, s + len - at - 1, key->buf, key->len))
        return 0;
    const char *start = at + key->len, *end = start;
    while (end < s + len && *end >= 0x20 && *end < 0x7F && *end != '"' && *end != '\\')
        end++;
    if (end >= s + len || *end != '"' || end == start)
        return 0;
    *v = start;
    *e = end;
    return 1;
}

/* head + the id at [v, e) + tail, a new reference (NULL: no memory) */
static PyObject *
id_line(PyObject *head, const char *v, const char *e, const Py_buffer *tail)
{
    Py_ssize_t hl = PyBytes_GET_SIZE(head);
    PyObject *line = PyBytes_FromStringAndSize(NULL, hl + (e - v) + tail->len);
    if (line) {
        char *o = PyBytes_AS_STRING(line);
        memcpy(o, PyBytes_AS_STRING(head), hl);
        memcpy(o + hl, v, e - v);
        memcpy(o + hl + (e - v), tail->buf, tail->len);
    }
    return line;
}

/* id_action_lines(payloads, key, heads, tail) -> list of bytes or None
 *
 * For each payload holding `key` (b'"eventID":"') exactly once, followed by a value of
 * printable ASCII without a quote or backslash: heads[i] + value + tail. None otherwise (and
 * for a None payload or head): the caller builds those lines the long way. */
static PyObject *
id_action_lines(PyObject *self, PyObject *args)
{
    PyObject *payloads, *heads;
    Py_buffer key, tail;
    if (!PyArg_ParseTuple(args, "O!y*O!y*", &PyList_Type, &payloads, &key, &PyList_Type, &heads, &tail))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(payloads);
    PyObject *out = NULL;
    if (PyList_GET_SIZE(heads) != n || key.len == 0) {
        PyErr_SetString(PyExc_ValueError, "id_action_lines: one head per payload, and a key");
        goto done;
    }
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *p = PyList_GET_ITEM(payloads, i), *h = PyList_GET_ITEM(heads, i), *line = NULL;
        const char *v, *e;
        if (PyBytes_Check(p) && PyBytes_Check(h) && plain_id(PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p), &key, &v, &e)) {
            line = id_line(h, v, e, &tail);
            if (!line) {
                Py_CLEAR(out);
                break;
            }
        }
        PyList_SET_ITEM(out, i, line ? line : Py_NewRef(Py_None));
    }
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&tail);
    return out;
}

/* keyed_action_lines(raws, unit, from_stamp, heads, head_for, key, tail) -> (payloads, lines)
 *
 * payloads_and_stamps, then for each message with a Timestamp t the action line head of its
 * time key (floor(t / 1e9) // unit when from_stamp, else 0): heads[key], or head_for(key) stored
 * there when heads has none; then, with a key (b'"eventID":"'), id_action_lines of that head.
 * A line is None where the message has no Timestamp (or, with a key, no plain id or no Payload).
 * bulk_lines.keyed_action_lines is the twin. */
static PyObject *
keyed_action_lines(PyObject *self, PyObject *args)
{
    PyObject *raws, *heads, *head_for;
    Py_ssize_t unit;
    int from_stamp;
    Py_buffer key, tail;
    if (!PyArg_ParseTuple(args, "O!npO!Oy*y*", &PyList_Type, &raws, &unit, &from_stamp, &PyDict_Type, &heads,
                          &head_for, &key, &tail))
        return NULL;
    PyObject *payloads = NULL, *lines = NULL, *last_head = NULL, *result = NULL;
    long long last_key = 0;
    if (unit < 1) {
        PyErr_SetString(PyExc_ValueError, "keyed_action_lines: unit must be 1 or more");
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(raws);
    payloads = PyList_New(n);
    lines = PyList_New(n);
    if (!payloads || !lines)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p, *line = NULL;
        unsigned long long stamp = 0;
        int has_stamp = 0;
        if (payload_and_stamp(PyList_GET_ITEM(raws, i), &p, &stamp, &has_stamp) < 0)
            goto done;
        if (has_stamp) {
            long long k = 0;
            if (from_stamp) { /* math.floor(t / 1e9) // unit, as Python computes it */
                long long secs = (long long)floor((double)(long long)stamp / 1e9);
                k = secs / unit - (secs % unit != 0 && secs < 0);
            }
            if (!last_head || k != last_key) {
                PyObject *pk = PyLong_FromLongLong(k), *h;
                if (!pk) {
                    Py_XDECREF(p);
                    goto done;
                }
                h = PyDict_GetItemWithError(heads, pk);
                if (h) {
                    Py_INCREF(h);
                } else if (!PyErr_Occurred()) {
                    h = PyObject_CallOneArg(head_for, pk);
                    if (h && (!PyBytes_Check(h) || PyDict_SetItem(heads, pk, h) < 0)) {
                        if (!PyErr_Occurred())
                            PyErr_SetString(PyExc_TypeError, "keyed_action_lines: head_for must give bytes");
                        Py_CLEAR(h);
                    }
                }
                Py_DECREF(pk);
                if (!h) {
                    Py_XDECREF(p);
                    goto done;
                }
                Py_XSETREF(last_head, h);
                last_key = k;
            }
            const char *v, *e;
            if (key.len == 0) {
                line = Py_NewRef(last_head);
            } else if (p && plain_id(PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p), &key, &v, &e)) {
                if (!(line = id_line(last_head, v, e, &tail))) {
                    Py_DECREF(p);
                    goto done;
                }
            }
        }
        PyList_SET_ITEM(payloads, i, p ? p : Py_NewRef(Py_None));
        PyList_SET_ITEM(lines, i, line ? line : Py_NewRef(Py_None));
    }
    result = Py_BuildValue("OO", payloads, lines);
done:
    Py_XDECREF(payloads);
    Py_XDECREF(lines);
    Py_XDECREF(last_head);
    PyBuffer_Release(&key);
    PyBuffer_Release(&tail);
    return result;
}

/* -- frame_json_records ------------------------------------------------------------------- */

#define JR_MAX_DEPTH 64
#define JR_MAX_KEYS 64   /* per object */
#define JR_MAX_NAMES 16

typedef struct {
    Py_ssize_t start, end;  /* the record, its final '}' at end - 1 */
    Py_ssize_t size;        /* of its message */
    unsigned long long ts;
    Py_ssize_t time_at;     /* eventTime's 20 bytes, or -1 */
    int add_stamp;
    Py_ssize_t field_at[JR_MAX_NAMES], field_len[JR_MAX_NAMES];
} jr_record;

/* 1 for the bytes a string holds as they are: not '"', '\\', or a control character. */
static const unsigned char jr_plain[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
};

/* The first byte from p on that is not plain (jr_plain), or end: 16 bytes a step with SSE2
 * (every x86-64), then (or else) one at a time. */
static inline Py_ssize_t
jr_plain_run(const unsigned char *b, Py_ssize_t p, Py_ssize_t end)
{
#ifdef JR_SSE2
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), control = _mm_set1_epi8(0x1F);
    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(b + p));
        __m128i special = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                       _mm_cmpeq_epi8(_mm_max_epu8(v, control), control)); /* v <= 0x1F */
        int mask = _mm_movemask_epi8(special);
        if (mask)
            return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#endif
    while (p < end && jr_plain[b[p]])
        p++;
    return p;
}

/* One of 64 bits for a key, a hash of its length and last 8 bytes (all of a shorter one): equal
 * keys have the same, so a key whose bit is not yet set in its object is not a duplicate. */
static inline uint64_t
jr_key_bit(const unsigned char *k, Py_ssize_t len)
{
    uint64_t h = (uint64_t)len;
    if (len >= 8) {
        uint64_t w;
        memcpy(&w, k + len - 8, 8);
        h ^= w;
    } else {
        for (Py_ssize_t i = 0; i < len; i++)
            h = (h << 8) ^ k[i];
    }
    return (uint64_t)1 << ((h * 0x9E3779B97F4A7C15ULL) >> 58);
}

/* The len bytes at a and at b are the same (keys: short, often of equal length). */
static inline int
jr_same(const unsigned char *a, const unsigned char *b, Py_ssize_t len)
{
    uint64_t x, y;
    if (len < 8) {
        for (Py_ssize_t i = 0; i < len; i++)
            if (a[i] != b[i])
                return 0;
        return 1;
    }
    memcpy(&x, a + len - 8, 8); /* the last 8 bytes first: "eventName" and "eventTime" differ there */
    memcpy(&y, b + len - 8, 8);
    return x == y && memcmp(a, b, len - 8) == 0;
}

/* A string as json.dumps(ensure_ascii=False) writes it, from the '"' at p: the index after its
 * closing quote, or -1. *escaped: it holds an escape. */
static Py_ssize_t
jr_string(const unsigned char *b, Py_ssize_t p, Py_ssize_t end, int *escaped)
{
    *escaped = 0;
    for (p++; p < end; p++) {
        p = jr_plain_run(b, p, end);
        if (p >= end)
            break;
        unsigned char c = b[p];
        if (c == '"')
            return p + 1;
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (p + 1 >= end)
                return -1;
            unsigned char e = b[p + 1];
            *escaped = 1;
            if (e == '"' || e == '\\' || e == 'n' || e == 'r' || e == 't' || e == 'b' || e == 'f') {
                p++;
            } else if (e == 'u' && p + 5 < end && b[p + 2] == '0' && b[p + 3] == '0' &&
                       (b[p + 4] == '0' || b[p + 4] == '1') &&
                       ((b[p + 5] >= '0' && b[p + 5] <= '9') || (b[p + 5] >= 'a' && b[p + 5] <= 'f'))) {
                int v = (b[p + 4] - '0') * 16 + (b[p + 5] <= '9' ? b[p + 5] - '0' : b[p + 5] - 'a' + 10);
                if (v == 8 || v == 9 || v == 10 || v == 12 || v == 13)
                    return -1;
                p += 5;
            } else {
                return -1;
            }
        }
    }
    return -1;
}

static int
jr_digits(const unsigned char *b, Py_ssize_t p, int n)
{
    int v = 0;
    for (int k = 0; k < n; k++) {
        if (b[p + k] < '0' || b[p + k] > '9')
            return -1;
        v = v * 10 + (b[p + k] - '0');
    }
    return v;
}

/* eventTime "YYYY-MM-DDTHH:MM:SSZ" (years 1970-2200) in ns since the epoch; 0 if it is not that. */
static int
jr_time(const unsigned char *b, Py_ssize_t p, unsigned long long *ns)
{
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (b[p + 4] != '-' || b[p + 7] != '-' || b[p + 10] != 'T' || b[p + 13] != ':' || b[p + 16] != ':' ||
        b[p + 19] != 'Z')
        return 0;
    int y = jr_digits(b, p, 4), m = jr_digits(b, p + 5, 2), d = jr_digits(b, p + 8, 2);
    int h = jr_digits(b, p + 11, 2), mi = jr_digits(b, p + 14, 2), s = jr_digits(b, p + 17, 2);
    if (y < 1970 || y > 2200 || m < 1 || m > 12 || d < 1 || h < 0 || h > 23 || mi < 0 || mi > 59 || s < 0 || s > 59)
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > mdays[m - 1] + (m == 2 && leap))
        return 0;
    /* days from civil (Howard Hinnant) */
    int yy = y - (m <= 2);
    long long era = yy / 400, yoe = yy - era * 400;
    long long doy = (153LL * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    long long days = era * 146097 + doe - 719468;
    *ns = (unsigned long long)((days * 86400 + h * 3600 + mi * 60 + s) * 1000000000LL);
    return 1;
}

/* One record written as json.dumps(separators=(",", ":"), ensure_ascii=False) would write it
 * (an object, no whitespace, no duplicate keys, integers only, short escapes), with a string
 * eventTime as above and string Fields without escapes. 1 and *r filled, or 0. */
static int
jr_record_scan(const unsigned char *b, Py_ssize_t p, Py_ssize_t end, Py_ssize_t nnames,
               const Py_buffer *names, const Py_buffer *stamp_key, jr_record *r)
{
    char kind[JR_MAX_DEPTH];                  /* '{' or '[' */
    int nkeys[JR_MAX_DEPTH];
    uint64_t key_bits[JR_MAX_DEPTH]; /* per object: a bit per key seen, by jr_key_bit */
    Py_ssize_t key_at[JR_MAX_DEPTH][JR_MAX_KEYS], key_len[JR_MAX_DEPTH][JR_MAX_KEYS];
    int depth = 0, escaped;
    Py_ssize_t top_key = -1, top_key_len = 0;
    r->start = p;
    r->time_at = -1;
    r->add_stamp = stamp_key->len > 0;
    for (Py_ssize_t k = 0; k < nnames; k++)
        r->field_at[k] = -1;
    if (p >= end || b[p] != '{')
        return 0;
    for (;;) {
        /* a value at p */
        if (p >= end)
            return 0;
        Py_ssize_t vstart = p;
        unsigned char c = b[p];
        if (c == '{' || c == '[') {
            if (depth == JR_MAX_DEPTH)
                return 0;
            kind[depth] = (char)c;
            key_bits[depth] = 0;
            nkeys[depth++] = 0;
            p++;
            if (p < end && b[p] == (c == '{' ? '}' : ']')) {
                depth--;
                p++;
            } else if (c == '[') {
                continue; /* its first value */
            } else {
                goto key;
            }
        } else if (c == '"') {
            p = jr_string(b, p, end, &escaped);
            if (p < 0)
                return 0;
            if (depth == 1 && top_key >= 0) {
                for (Py_ssize_t k = 0; k < nnames; k++) {
                    if (top_key_len == names[k].len && memcmp(b + top_key, names[k].buf, top_key_len) == 0) {
                        if (escaped)
                            return 0;
                        r->field_at[k] = vstart + 1;
                        r->field_len[k] = p - vstart - 2;
                    }
                }
                if (top_key_len == 9 && memcmp(b + top_key, "eventTime", 9) == 0) {
                    if (p - vstart != 22 || !jr_time(b, vstart + 1, &r->ts))
                        return 0;
                    r->time_at = vstart + 1;
                }
            }
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            if (c == '-')
                p++;
            if (p >= end || b[p] < '0' || b[p] > '9')
                return 0;
            if (b[p] == '0') {
                p++;
                if (c == '-')
                    return 0; /* -0 is written 0 */
            } else {
                while (p < end && b[p] >= '0' && b[p] <= '9')
                    p++;
            }
            if (p < end && (b[p] == '.' || b[p] == 'e' || b[p] == 'E' || (b[p] >= '0' && b[p] <= '9')))
                return 0; /* a float: its repr may differ */
        } else if (c == 't' && end - p >= 4 && memcmp(b + p, "true", 4) == 0) {
            p += 4;
        } else if (c == 'f' && end - p >= 5 && memcmp(b + p, "false", 5) == 0) {
            p += 5;
        } else if (c == 'n' && end - p >= 4 && memcmp(b + p, "null", 4) == 0) {
            p += 4;
        } else {
            return 0;
        }
        if (depth == 1 && top_key >= 0 && b[vstart] != '"') {
            if (top_key_len == 9 && memcmp(b + top_key, "eventTime", 9) == 0)
                return 0; /* not a string: no Timestamp from it */
        }
        /* after a value */
        for (;;) {
            if (depth == 0) {
                r->end = p;
                return r->time_at >= 0;
            }
            if (p >= end)
                return 0;
            if (b[p] == ',') {
                p++;
                if (kind[depth - 1] == '{')
                    goto key;
                break; /* the next value of the array */
            }
            if (b[p] != (kind[depth - 1] == '{' ? '}' : ']'))
                return 0;
            p++;
            depth--;
        }
        continue;
    key:
        if (p >= end || b[p] != '"')
            return 0;
        {
            Py_ssize_t kstart = p + 1;
            p = jr_string(b, p, end, &escaped);
            if (p < 0 || p >= end || b[p] != ':')
                return 0;
            Py_ssize_t klen = p - kstart - 1;
            int d = depth - 1, n = nkeys[d];
            if (n == JR_MAX_KEYS)
                return 0;
            uint64_t bit = jr_key_bit(b + kstart, klen);
            if (key_bits[d] & bit) /* maybe seen: compared with each (a new key's bit is mostly new) */
                for (int k = 0; k < n; k++)
                    if (key_len[d][k] == klen && jr_same(b + key_at[d][k], b + kstart, klen))
                        return 0; /* a duplicate key: json keeps the last */
            key_bits[d] |= bit;
            key_at[d][n] = kstart;
            key_len[d][n] = klen;
            nkeys[d] = n + 1;
            if (depth == 1) {
                top_key = kstart;
                top_key_len = klen;
                if (klen == stamp_key->len && memcmp(b + kstart, stamp_key->buf, klen) == 0)
                    r->add_stamp = 0;
            }
            p++;
        }
    }
}

/* The end of the JSON value at p, found by its brackets and strings alone (any JSON), or -1. */
static Py_ssize_t
jr_skip(const unsigned char *b, Py_ssize_t p, Py_ssize_t end)
{
    Py_ssize_t depth = 0;
    for (; p < end; p++) {
        unsigned char c = b[p];
        if (c == '"') {
            for (p++; p < end && b[p] != '"'; p++)
                if (b[p] == '\\')
                    p++;
            if (p >= end)
                return -1;
            if (depth == 0)
                return p + 1;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (--depth < 0)
                return -1;
            if (depth == 0)
                return p + 1;
        } else if (depth == 0 && (c == ',' || c == ' ' || c == '\t' || c == '\r' || c == '\n')) {
            return p;
        }
    }
    return depth == 0 ? p : -1;
}

static int
jr_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* frame_json_records(data, pos, max_records, uuids, head, tail, names, stamp_key, max_size)
 *   -> (framed, count, pos, status, odd_end)
 *
 * The elements of a JSON array from `pos` (the start of one, or whitespace before it), as
 * messages: Payload = the record's bytes, with ,"<stamp_key>":"<eventTime>" before its final
 * '}' unless it has that key (or stamp_key is b""), Timestamp = eventTime, then string Fields
 * names[k] (JSON-escaped key text) where the record has them. Only records written exactly as
 * json.dumps(separators=(",", ":"), ensure_ascii=False) writes them are taken (see
 * jr_record_scan), and only whole messages of at most max_size bytes. Stops: status 0 after
 * max_records, pos at the next element; 1 at the array's ']' (pos there); 2 at an element it
 * does not take (pos its start, odd_end its end, -1 when its end cannot be found); 3 when the
 * text after an element is neither ',' nor ']' (pos there). */
static PyObject *
frame_json_records(PyObject *self, PyObject *args)
{
    Py_buffer data, uuids, head, tail, stamp_key;
    Py_ssize_t pos, max_records, max_size;
    PyObject *names;
    if (!PyArg_ParseTuple(args, "y*nny*y*y*O!y*n", &data, &pos, &max_records, &uuids, &head, &tail, &PyList_Type,
                          &names, &stamp_key, &max_size))
        return NULL;
    PyObject *result = NULL;
    jr_record *recs = NULL;
    Py_buffer nb[JR_MAX_NAMES];
    unsigned char prefix[JR_MAX_NAMES][104];
    Py_ssize_t prefix_len[JR_MAX_NAMES];
    Py_ssize_t nnames = PyList_GET_SIZE(names), got = 0;
    if (nnames > JR_MAX_NAMES || max_records < 0 || uuids.len < 16 * max_records) {
        PyErr_SetString(PyExc_ValueError, "frame_json_records: too many names, or too few uuids");
        goto done;
    }
    for (; got < nnames; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(names, got), &nb[got], PyBUF_SIMPLE) < 0)
            goto done;
        if (nb[got].len > 100) {
            got++;
            PyErr_SetString(PyExc_ValueError, "frame_json_records: a name longer than 100 bytes");
            goto done;
        }
        /* the Field's name with its keys: 0x0A varint(len) name 0x22 */
        prefix[got][0] = 0x0A;
        prefix_len[got] = 1 + put_varint(prefix[got] + 1, nb[got].len);
        memcpy(prefix[got] + prefix_len[got], nb[got].buf, nb[got].len);
        prefix_len[got] += nb[got].len;
        prefix[got][prefix_len[got]++] = 0x22;
    }
    recs = PyMem_Malloc(sizeof(jr_record) * (max_records > 0 ? max_records : 1));
    if (!recs) {
        PyErr_NoMemory();
        goto done;
    }
    const unsigned char *b = data.buf;
    Py_ssize_t end = data.len, n = 0, total = 0, odd_end = -1;
    int status = 0;
    Py_ssize_t stamp_extra = stamp_key.len + 26; /* ,"key":"<20 bytes>" */
    Py_ssize_t fixed = 18 + 1 + head.len + tail.len;
    if (pos < 0)
        pos = 0;
    while (pos < end && jr_space(b[pos]))
        pos++;
    while (n < max_records) {
        if (pos < end && b[pos] == ']') {
            status = 1;
            break;
        }
        jr_record *r = &recs[n];
        Py_ssize_t size = 0;
        int ok = jr_record_scan(b, pos, end, nnames, nb, &stamp_key, r);
        if (ok) {
            Py_ssize_t plen = r->end - r->start + (r->add_stamp ? stamp_extra : 0);
            size = fixed + varint_len(r->ts) + varint_len(plen) + plen;
            for (Py_ssize_t k = 0; k < nnames; k++)
                if (r->field_at[k] >= 0)
                    size += field_size(prefix_len[k], r->field_len[k]);
            ok = size <= max_size;
            r->size = size;
        }
        if (!ok) {
            status = 2;
            odd_end = jr_skip(b, pos, end);
            break;
        }
        total += 4 + varint_len(size) + size;
        n++;
        pos = r->end;
        while (pos < end && jr_space(b[pos]))
            pos++;
        if (pos < end && b[pos] == ',') {
            pos++;
            while (pos < end && jr_space(b[pos]))
                pos++;
        } else if (pos < end && b[pos] == ']') {
            status = 1;
            break;
        } else {
            status = 3;
            break;
        }
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (!result)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *u = uuids.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        jr_record *r = &recs[i];
        Py_ssize_t body = r->end - r->start - 1, plen = body + 1 + (r->add_stamp ? stamp_extra : 0);
        out = put_stamped_head(out, r->size, u + 16 * i, r->ts, &head, plen);
        memcpy(out, b + r->start, body);
        out += body;
        if (r->add_stamp) {
            *out++ = ',';
            *out++ = '"';
            memcpy(out, stamp_key.buf, stamp_key.len);
            out += stamp_key.len;
            memcpy(out, "\":\"", 3);
            out += 3;
            memcpy(out, b + r->time_at, 20);
            out += 20;
            *out++ = '"';
        }
        *out++ = '}';
        memcpy(out, tail.buf, tail.len);
        out += tail.len;
        for (Py_ssize_t k = 0; k < nnames; k++)
            if (r->field_at[k] >= 0)
                out = put_field(out, prefix[k], prefix_len[k], b + r->field_at[k], r->field_len[k]);
    }
    {
        PyObject *t = Py_BuildValue("Nnnin", result, n, pos, status, odd_end);
        result = t;
    }
done:
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&nb[k]);
    PyMem_Free(recs);
    PyBuffer_Release(&data);
    PyBuffer_Release(&uuids);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    PyBuffer_Release(&stamp_key);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_quick", scan_quick, METH_VARARGS, "The common frames of a trusted queue buffer (see the C source)."},
    {"frame_payloads", frame_payloads, METH_VARARGS, "Framed Payload-only messages (see the C source)."},
    {"count_lines", count_lines, METH_VARARGS, "Lines of a block up to the first too long (see the C source)."},
    {"frame_lines", frame_lines, METH_VARARGS, "Framed Payload-only messages, one per line (see the C source)."},
    {"cut_payloads", cut_payloads, METH_VARARGS, "Payloads of messages of one learned shape (see the C source)."},
    {"every_line_is_an_object", every_line_is_an_object, METH_O, "Every line of a bulk body starts with '{'."},
    {"one_line_objects", one_line_objects, METH_O, "Every payload starts with '{' and has no line feed."},
    {"frame_records", frame_records, METH_VARARGS, "Framed messages with Timestamp and Fields (see the C source)."},
    {"header_selection", header_selection, METH_VARARGS, "Which messages have a header equal to a value."},
    {"payloads_and_stamps", payloads_and_stamps, METH_O, "Payload and Timestamp of each message (see the C source)."},
    {"id_action_lines", id_action_lines, METH_VARARGS, "Bulk action lines with an _id from the payload."},
    {"message_documents_size", message_documents_size, METH_O, "Bytes of the Payloads that are documents as they are."},
    {"bulk_body_of_messages", bulk_body_of_messages, METH_VARARGS, "A bulk body from messages' Payloads (see the C source)."},
    {"keyed_action_lines", keyed_action_lines, METH_VARARGS, "Payloads and their time-keyed action lines."},
    {"frame_json_records", frame_json_records, METH_VARARGS, "CloudTrail-style records of a JSON array, framed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hindsight_py._speedups", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
