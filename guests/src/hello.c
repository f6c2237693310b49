// The example app's function: says which region served it, and echoes
// requests back. Built into a wasi:http/proxy component by ../build.sh; it
// runs unchanged under `wasmtime serve`.
#include "common.h"
#include <stdio.h>

static const char *method_name(wasi_http_types_method_t *m) {
  static const char *names[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"};
  return m->tag < 9 ? names[m->tag] : "OTHER";
}

static void echo(request_t req, outparam_t out, const char *path) {
  buf_t b = {0};
  wasi_http_types_borrow_incoming_request_t r = wasi_http_types_borrow_incoming_request(req);
  wasi_http_types_method_t m;
  wasi_http_types_method_incoming_request_method(r, &m);
  buf_puts(&b, method_name(&m));
  buf_puts(&b, " ");
  buf_puts(&b, path);
  buf_puts(&b, "\n");

  wasi_http_types_own_fields_t h = wasi_http_types_method_incoming_request_headers(r);
  wasi_http_types_list_tuple2_field_name_field_value_t entries;
  wasi_http_types_method_fields_entries(wasi_http_types_borrow_fields(h), &entries);
  for (size_t i = 0; i < entries.len; i++) {
    buf_put(&b, entries.ptr[i].f0.ptr, entries.ptr[i].f0.len);
    buf_puts(&b, ": ");
    buf_put(&b, entries.ptr[i].f1.ptr, entries.ptr[i].f1.len);
    buf_puts(&b, "\n");
  }
  wasi_http_types_list_tuple2_field_name_field_value_free(&entries);
  wasi_http_types_fields_drop_own(h);
  buf_puts(&b, "\n");

  wasi_http_types_own_incoming_body_t body;
  if (wasi_http_types_method_incoming_request_consume(r, &body)) {
    wasi_http_types_own_input_stream_t stream;
    if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &stream)) {
      for (;;) {
        proxy_list_u8_t chunk;
        wasi_io_streams_stream_error_t err;
        if (!wasi_io_streams_method_input_stream_blocking_read(wasi_io_streams_borrow_input_stream(stream),
                                                               65536, &chunk, &err))
          break;
        buf_put(&b, chunk.ptr, chunk.len);
        proxy_list_u8_free(&chunk);
      }
      wasi_io_streams_input_stream_drop_own(stream);
    }
    wasi_http_types_incoming_body_drop_own(body);
  }
  respond(out, 200, "text/plain; charset=utf-8", b.ptr, b.len);
  free(b.ptr);
}

void exports_wasi_http_incoming_handler_handle(request_t req, outparam_t out) {
  char *path = request_path(req);
  if (strncmp(path, "/echo", 5) == 0) {
    echo(req, out, path);
  } else {
    // The region tells the function where it runs in a request header.
    char *region = request_header(req, "x-meridian-region");
    char text[160];
    snprintf(text, sizeof text, "Hello from %s!\n", region ? region : "an unknown region");
    respond_text(out, 200, text);
    free(region);
  }
  free(path);
  wasi_http_types_incoming_request_drop_own(req);
}
