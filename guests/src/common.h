// Small helpers over the wit-bindgen C bindings of wasi:http/proxy, shared by
// the guests in this directory. Each guest defines
// exports_wasi_http_incoming_handler_handle() and uses these to answer.
#ifndef MERIDIAN_GUEST_COMMON_H
#define MERIDIAN_GUEST_COMMON_H

#include "proxy.h"
#include <stdlib.h>
#include <string.h>

typedef wasi_http_types_own_incoming_request_t request_t;
typedef wasi_http_types_own_response_outparam_t outparam_t;

// Growable byte buffer.
typedef struct {
  uint8_t *ptr;
  size_t len, cap;
} buf_t;

static void buf_put(buf_t *b, const void *data, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->len + n) cap *= 2;
    b->ptr = realloc(b->ptr, cap);
    if (!b->ptr) abort();
    b->cap = cap;
  }
  memcpy(b->ptr + b->len, data, n);
  b->len += n;
}

static void buf_puts(buf_t *b, const char *s) { buf_put(b, s, strlen(s)); }

// The request path, NUL-terminated; "/" if absent. Caller frees.
static char *request_path(request_t req) {
  proxy_string_t s;
  wasi_http_types_borrow_incoming_request_t r = wasi_http_types_borrow_incoming_request(req);
  if (!wasi_http_types_method_incoming_request_path_with_query(r, &s)) return strdup("/");
  char *out = malloc(s.len + 1);
  memcpy(out, s.ptr, s.len);
  out[s.len] = 0;
  proxy_string_free(&s);
  return out;
}

// First value of a request header, NUL-terminated, or NULL. Caller frees.
static char *request_header(request_t req, const char *name) {
  wasi_http_types_own_fields_t h =
      wasi_http_types_method_incoming_request_headers(wasi_http_types_borrow_incoming_request(req));
  wasi_http_types_field_name_t n = {(uint8_t *)name, strlen(name)};
  wasi_http_types_list_field_value_t vals;
  wasi_http_types_method_fields_get(wasi_http_types_borrow_fields(h), &n, &vals);
  char *out = NULL;
  if (vals.len > 0) {
    out = malloc(vals.ptr[0].len + 1);
    memcpy(out, vals.ptr[0].ptr, vals.ptr[0].len);
    out[vals.ptr[0].len] = 0;
  }
  wasi_http_types_list_field_value_free(&vals);
  wasi_http_types_fields_drop_own(h);
  return out;
}

// A header of a response: name and value, both NUL-terminated.
typedef struct {
  const char *name, *value;
} header_t;

// Sends a complete response with the `n` headers `hs` and `body`.
static void respond_with(outparam_t out, uint16_t status, const header_t *hs, size_t n, const uint8_t *body,
                         size_t len) {
  wasi_http_types_tuple2_field_name_field_value_t entry[8];
  if (n > 8) abort();
  for (size_t i = 0; i < n; i++) {
    entry[i].f0.ptr = (uint8_t *)hs[i].name;
    entry[i].f0.len = strlen(hs[i].name);
    entry[i].f1.ptr = (uint8_t *)hs[i].value;
    entry[i].f1.len = strlen(hs[i].value);
  }
  wasi_http_types_list_tuple2_field_name_field_value_t entries = {entry, n};
  wasi_http_types_own_fields_t headers;
  wasi_http_types_header_error_t herr;
  if (!wasi_http_types_static_fields_from_list(&entries, &headers, &herr)) abort();

  wasi_http_types_own_outgoing_response_t resp = wasi_http_types_constructor_outgoing_response(headers);
  wasi_http_types_borrow_outgoing_response_t bresp = wasi_http_types_borrow_outgoing_response(resp);
  wasi_http_types_method_outgoing_response_set_status_code(bresp, status);
  wasi_http_types_own_outgoing_body_t body_res;
  if (!wasi_http_types_method_outgoing_response_body(bresp, &body_res)) abort();

  wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
  result.val.ok = resp;
  wasi_http_types_static_response_outparam_set(out, &result);

  wasi_http_types_own_output_stream_t stream;
  if (!wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(body_res), &stream))
    abort();
  wasi_io_streams_borrow_output_stream_t bs = wasi_io_streams_borrow_output_stream(stream);
  // blocking-write-and-flush accepts at most 4096 bytes per call.
  for (size_t off = 0; off < len;) {
    size_t n = len - off > 4096 ? 4096 : len - off;
    proxy_list_u8_t chunk = {(uint8_t *)body + off, n};
    wasi_io_streams_stream_error_t err;
    if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(bs, &chunk, &err)) break;
    off += n;
  }
  wasi_io_streams_output_stream_drop_own(stream);
  wasi_http_types_error_code_t ferr;
  wasi_http_types_static_outgoing_body_finish(body_res, NULL, &ferr);
}

// Sends a complete response with one content-type header and `body`.
static void respond(outparam_t out, uint16_t status, const char *content_type, const uint8_t *body,
                    size_t len) {
  header_t h = {"content-type", content_type};
  respond_with(out, status, &h, 1, body, len);
}

static void respond_text(outparam_t out, uint16_t status, const char *text) {
  respond(out, status, "text/plain; charset=utf-8", (const uint8_t *)text, strlen(text));
}

#endif
