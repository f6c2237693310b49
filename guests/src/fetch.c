// A function that makes one outgoing HTTP request: GET /fetch?url=URL
// answers 200 "upstream STATUS\n" + the body it read, or 502 "error-code N"
// when the host refused or failed the request (N is the wasi:http
// error-code case: 15 = HTTP-request-denied, 4 = destination-IP-prohibited,
// 28 = HTTP-response-body-size). Used by the egress tests.
#include "common.h"
#include <stdio.h>

static void fail(outparam_t out, const char *what, int code) {
  char text[96];
  snprintf(text, sizeof text, "%s %d\n", what, code);
  respond_text(out, 502, text);
}

static void fetch(outparam_t out, const char *url) {
  int https = strncmp(url, "https://", 8) == 0;
  if (!https && strncmp(url, "http://", 7) != 0) {
    respond_text(out, 400, "url must start with http:// or https://\n");
    return;
  }
  const char *auth = url + (https ? 8 : 7);
  const char *slash = strchr(auth, '/');
  size_t auth_len = slash ? (size_t)(slash - auth) : strlen(auth);
  const char *path = slash ? slash : "/";

  wasi_http_types_own_outgoing_request_t req =
      wasi_http_types_constructor_outgoing_request(wasi_http_types_constructor_fields());
  wasi_http_types_borrow_outgoing_request_t r = wasi_http_types_borrow_outgoing_request(req);
  wasi_http_types_scheme_t scheme = {.tag = https ? WASI_HTTP_TYPES_SCHEME_HTTPS : WASI_HTTP_TYPES_SCHEME_HTTP};
  wasi_http_types_method_outgoing_request_set_scheme(r, &scheme);
  proxy_string_t a = {(uint8_t *)auth, auth_len};
  wasi_http_types_method_outgoing_request_set_authority(r, &a);
  proxy_string_t p = {(uint8_t *)path, strlen(path)};
  wasi_http_types_method_outgoing_request_set_path_with_query(r, &p);

  wasi_http_outgoing_handler_own_future_incoming_response_t fut;
  wasi_http_outgoing_handler_error_code_t err;
  if (!wasi_http_outgoing_handler_handle(req, NULL, &fut, &err)) {
    fail(out, "error-code", err.tag);
    return;
  }
  wasi_http_types_borrow_future_incoming_response_t f = wasi_http_types_borrow_future_incoming_response(fut);
  wasi_http_types_result_result_own_incoming_response_error_code_void_t got;
  while (!wasi_http_types_method_future_incoming_response_get(f, &got)) {
    wasi_io_poll_own_pollable_t poll = wasi_http_types_method_future_incoming_response_subscribe(f);
    wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(poll));
    wasi_io_poll_pollable_drop_own(poll);
  }
  wasi_http_types_future_incoming_response_drop_own(fut);
  if (got.is_err) {
    fail(out, "future", 0);
    return;
  }
  if (got.val.ok.is_err) {
    fail(out, "error-code", got.val.ok.val.err.tag);
    return;
  }
  wasi_http_types_own_incoming_response_t resp = got.val.ok.val.ok;
  wasi_http_types_borrow_incoming_response_t rb = wasi_http_types_borrow_incoming_response(resp);
  buf_t b = {0};
  char head[32];
  snprintf(head, sizeof head, "upstream %d\n", wasi_http_types_method_incoming_response_status(rb));
  buf_puts(&b, head);
  wasi_http_types_own_incoming_body_t body;
  int broken = 0;
  if (wasi_http_types_method_incoming_response_consume(rb, &body)) {
    wasi_http_types_own_input_stream_t stream;
    if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &stream)) {
      for (;;) {
        proxy_list_u8_t chunk;
        wasi_io_streams_stream_error_t serr;
        if (!wasi_io_streams_method_input_stream_blocking_read(wasi_io_streams_borrow_input_stream(stream), 65536,
                                                               &chunk, &serr)) {
          broken = serr.tag != WASI_IO_STREAMS_STREAM_ERROR_CLOSED;
          break;
        }
        buf_put(&b, chunk.ptr, chunk.len);
        proxy_list_u8_free(&chunk);
      }
      wasi_io_streams_input_stream_drop_own(stream);
    }
    wasi_http_types_incoming_body_drop_own(body);
  }
  wasi_http_types_incoming_response_drop_own(resp);
  if (broken) {
    char text[64];
    snprintf(text, sizeof text, "body error after %zu bytes\n", b.len);
    respond_text(out, 502, text);
  } else {
    respond(out, 200, "text/plain; charset=utf-8", b.ptr, b.len);
  }
  free(b.ptr);
}

void exports_wasi_http_incoming_handler_handle(request_t req, outparam_t out) {
  char *path = request_path(req);
  char *q = strstr(path, "?url=");
  if (q) {
    fetch(out, q + 5);
  } else {
    respond_text(out, 400, "GET /fetch?url=http://host:port/path\n");
  }
  free(path);
  wasi_http_types_incoming_request_drop_own(req);
}
