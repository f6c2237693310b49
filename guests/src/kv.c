// A key-value function over wasi:keyvalue@0.2.0-draft2, exposed over HTTP.
// Buckets are the namespaces declared in the app's meridian.toml.
//
//   GET    /kv/BUCKET/KEY            value, or 404
//   GET    /kv/BUCKET/KEY?exists     "true" / "false"
//   PUT    /kv/BUCKET/KEY            store the request body
//   DELETE /kv/BUCKET/KEY
//   POST   /kv/BUCKET/KEY?incr=N     atomic increment; answers the new total
//   POST   /kv/BUCKET/KEY?append     compare-and-swap loop appending the body
//   GET    /kv/BUCKET                every key (paged through list-keys)
//   GET    /kv/BUCKET?many=K1,K2     batch get-many: "key=value" lines
//   GET    /kv/BUCKET/KEY?bench=N    N gets of KEY, timed inside the guest
//
// Store errors come back as 404 (no such bucket), 403 (access denied), 504
// (a write whose outcome is unknown) or 503 (anything else, including a
// write certainly not applied), with the host's message.
#include "common.h"
#include <stdio.h>
#include <time.h>

typedef wasi_keyvalue_store_error_t kv_error_t;

static proxy_string_t str_of(const char *s, size_t n) {
  proxy_string_t out = {(uint8_t *)s, n};
  return out;
}

static void respond_error(outparam_t out, kv_error_t *e) {
  char text[512];
  switch (e->tag) {
    case WASI_KEYVALUE_STORE_ERROR_NO_SUCH_STORE:
      respond_text(out, 404, "no such bucket (declare it under [kv] in meridian.toml)\n");
      return;
    case WASI_KEYVALUE_STORE_ERROR_ACCESS_DENIED:
      respond_text(out, 403, "access to this bucket is denied\n");
      return;
    default: {
      // The host says whether a failed write was certainly not applied
      // (503: retrying is safe) or may have been (504: retry with the same
      // Idempotency-Key, or read first).
      static const char unknown[] = "outcome unknown";
      int maybe_applied = e->val.other.len >= sizeof unknown - 1 &&
                          memcmp(e->val.other.ptr, unknown, sizeof unknown - 1) == 0;
      snprintf(text, sizeof text, "key-value error: %.*s\n", (int)e->val.other.len, (const char *)e->val.other.ptr);
      proxy_string_free(&e->val.other);
      respond_text(out, maybe_applied ? 504 : 503, text);
    }
  }
}

static wasi_http_types_method_t request_method(request_t req) {
  wasi_http_types_method_t m;
  wasi_http_types_method_incoming_request_method(wasi_http_types_borrow_incoming_request(req), &m);
  return m;
}

static void read_body(request_t req, buf_t *b) {
  wasi_http_types_own_incoming_body_t body;
  wasi_http_types_borrow_incoming_request_t r = wasi_http_types_borrow_incoming_request(req);
  if (!wasi_http_types_method_incoming_request_consume(r, &body)) return;
  wasi_http_types_own_input_stream_t stream;
  if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &stream)) {
    for (;;) {
      proxy_list_u8_t chunk;
      wasi_io_streams_stream_error_t err;
      if (!wasi_io_streams_method_input_stream_blocking_read(wasi_io_streams_borrow_input_stream(stream), 65536,
                                                             &chunk, &err))
        break;
      buf_put(b, chunk.ptr, chunk.len);
      proxy_list_u8_free(&chunk);
    }
    wasi_io_streams_input_stream_drop_own(stream);
  }
  wasi_http_types_incoming_body_drop_own(body);
}

static void list_all(outparam_t out, wasi_keyvalue_store_borrow_bucket_t bucket) {
  buf_t b = {0};
  proxy_string_t cursor = {0};
  bool have_cursor = false;
  for (;;) {
    wasi_keyvalue_store_key_response_t page;
    kv_error_t err;
    if (!wasi_keyvalue_store_method_bucket_list_keys(bucket, have_cursor ? &cursor : NULL, &page, &err)) {
      free(b.ptr);
      respond_error(out, &err);
      return;
    }
    if (have_cursor) proxy_string_free(&cursor);
    for (size_t i = 0; i < page.keys.len; i++) {
      buf_put(&b, page.keys.ptr[i].ptr, page.keys.ptr[i].len);
      buf_puts(&b, "\n");
    }
    proxy_list_string_free(&page.keys);
    have_cursor = page.cursor.is_some;
    if (!have_cursor) break;
    cursor = page.cursor.val;
  }
  respond(out, 200, "text/plain; charset=utf-8", b.ptr, b.len);
  free(b.ptr);
}

static void get_many(outparam_t out, wasi_keyvalue_store_borrow_bucket_t bucket, const char *list) {
  proxy_string_t keys[64];
  size_t n = 0;
  for (const char *p = list; *p && n < 64;) {
    const char *end = strchr(p, ',');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    keys[n++] = str_of(p, len);
    p += len + (end ? 1 : 0);
  }
  proxy_list_string_t klist = {keys, n};
  proxy_list_option_tuple2_string_list_u8_t vals;
  kv_error_t err;
  if (!wasi_keyvalue_batch_get_many(bucket, &klist, &vals, &err)) {
    respond_error(out, &err);
    return;
  }
  buf_t b = {0};
  for (size_t i = 0; i < vals.len; i++) {
    if (!vals.ptr[i].is_some) continue;
    buf_put(&b, vals.ptr[i].val.f0.ptr, vals.ptr[i].val.f0.len);
    buf_puts(&b, "=");
    buf_put(&b, vals.ptr[i].val.f1.ptr, vals.ptr[i].val.f1.len);
    buf_puts(&b, "\n");
  }
  proxy_list_option_tuple2_string_list_u8_free(&vals);
  respond(out, 200, "text/plain; charset=utf-8", b.ptr, b.len);
  free(b.ptr);
}

// Appends `add` to the key's value with compare-and-swap, retrying when
// another writer got there first.
static void append(outparam_t out, wasi_keyvalue_store_borrow_bucket_t bucket, proxy_string_t *key, buf_t *add) {
  wasi_keyvalue_atomics_own_cas_t cas;
  kv_error_t err;
  if (!wasi_keyvalue_atomics_static_cas_new(bucket, key, &cas, &err)) {
    respond_error(out, &err);
    return;
  }
  for (int attempt = 1;; attempt++) {
    proxy_option_list_u8_t cur;
    if (!wasi_keyvalue_atomics_method_cas_current(wasi_keyvalue_atomics_borrow_cas(cas), &cur, &err)) {
      wasi_keyvalue_atomics_cas_drop_own(cas);
      respond_error(out, &err);
      return;
    }
    buf_t next = {0};
    if (cur.is_some) {
      buf_put(&next, cur.val.ptr, cur.val.len);
      proxy_list_u8_free(&cur.val);
    }
    buf_put(&next, add->ptr, add->len);
    proxy_list_u8_t v = {next.ptr, next.len};
    wasi_keyvalue_atomics_cas_error_t cerr;
    bool ok = wasi_keyvalue_atomics_swap(cas, &v, &cerr);  // consumes `cas`
    size_t total = next.len;
    free(next.ptr);
    if (ok) {
      char text[96];
      snprintf(text, sizeof text, "%zu bytes after %d attempt(s)\n", total, attempt);
      respond_text(out, 200, text);
      return;
    }
    if (cerr.tag == WASI_KEYVALUE_ATOMICS_CAS_ERROR_STORE_ERROR) {
      respond_error(out, &cerr.val.store_error);
      return;
    }
    cas = cerr.val.cas_failed;  // the key moved on: retry from its new value
  }
}

static void handle(request_t req, outparam_t out, char *path) {
  // path = "/kv/BUCKET[/KEY][?QUERY]"
  char *query = strchr(path, '?');
  if (query) *query++ = 0;
  char *bucket_name = path + 4;
  char *key = strchr(bucket_name, '/');
  if (key) *key++ = 0;
  if (!*bucket_name) {
    respond_text(out, 400, "usage: /kv/BUCKET/KEY\n");
    return;
  }
  proxy_string_t bname = str_of(bucket_name, strlen(bucket_name));
  wasi_keyvalue_store_own_bucket_t owned;
  kv_error_t err;
  if (!wasi_keyvalue_store_open(&bname, &owned, &err)) {
    respond_error(out, &err);
    return;
  }
  wasi_keyvalue_store_borrow_bucket_t bucket = wasi_keyvalue_store_borrow_bucket(owned);
  wasi_http_types_method_t m = request_method(req);

  if (!key || !*key) {
    if (query && strncmp(query, "many=", 5) == 0)
      get_many(out, bucket, query + 5);
    else
      list_all(out, bucket);
  } else {
    proxy_string_t k = str_of(key, strlen(key));
    if (m.tag == WASI_HTTP_TYPES_METHOD_GET && query && strncmp(query, "bench=", 6) == 0) {
      // Each get timed on its own, from the guest's side of the call.
      long n = strtol(query + 6, NULL, 10);
      if (n < 1 || n > 100000) n = 1000;
      uint64_t *ns = malloc(sizeof(uint64_t) * n);
      bool ok = true;
      for (long i = 0; i < n && ok; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        proxy_option_list_u8_t v;
        ok = wasi_keyvalue_store_method_bucket_get(bucket, &k, &v, &err);
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (ok && v.is_some) proxy_list_u8_free(&v.val);
        ns[i] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)(b.tv_nsec - a.tv_nsec);
      }
      if (!ok) {
        respond_error(out, &err);
      } else {
        // Insertion sort is fine for the sizes used here.
        for (long i = 1; i < n; i++) {
          uint64_t x = ns[i];
          long j = i - 1;
          while (j >= 0 && ns[j] > x) { ns[j + 1] = ns[j]; j--; }
          ns[j + 1] = x;
        }
        char text[160];
        snprintf(text, sizeof text, "gets=%ld p50_ns=%llu p99_ns=%llu\n", n, (unsigned long long)ns[n / 2],
                 (unsigned long long)ns[n * 99 / 100]);
        respond_text(out, 200, text);
      }
      free(ns);
    } else if (m.tag == WASI_HTTP_TYPES_METHOD_GET && query && strcmp(query, "exists") == 0) {
      bool yes;
      if (wasi_keyvalue_store_method_bucket_exists(bucket, &k, &yes, &err))
        respond_text(out, 200, yes ? "true\n" : "false\n");
      else
        respond_error(out, &err);
    } else if (m.tag == WASI_HTTP_TYPES_METHOD_GET) {
      proxy_option_list_u8_t v;
      if (!wasi_keyvalue_store_method_bucket_get(bucket, &k, &v, &err)) {
        respond_error(out, &err);
      } else if (!v.is_some) {
        respond_text(out, 404, "not found\n");
      } else {
        respond(out, 200, "application/octet-stream", v.val.ptr, v.val.len);
        proxy_list_u8_free(&v.val);
      }
    } else if (m.tag == WASI_HTTP_TYPES_METHOD_PUT) {
      buf_t b = {0};
      read_body(req, &b);
      proxy_list_u8_t v = {b.ptr, b.len};
      if (wasi_keyvalue_store_method_bucket_set(bucket, &k, &v, &err))
        respond_text(out, 200, "stored\n");
      else
        respond_error(out, &err);
      free(b.ptr);
    } else if (m.tag == WASI_HTTP_TYPES_METHOD_DELETE) {
      if (wasi_keyvalue_store_method_bucket_delete(bucket, &k, &err))
        respond_text(out, 200, "deleted\n");
      else
        respond_error(out, &err);
    } else if (m.tag == WASI_HTTP_TYPES_METHOD_POST && query && strncmp(query, "incr=", 5) == 0) {
      int64_t total;
      if (wasi_keyvalue_atomics_increment(bucket, &k, strtoll(query + 5, NULL, 10), &total, &err)) {
        char text[32];
        snprintf(text, sizeof text, "%lld\n", (long long)total);
        respond_text(out, 200, text);
      } else {
        respond_error(out, &err);
      }
    } else if (m.tag == WASI_HTTP_TYPES_METHOD_POST && query && strcmp(query, "append") == 0) {
      buf_t b = {0};
      read_body(req, &b);
      append(out, bucket, &k, &b);
      free(b.ptr);
    } else {
      respond_text(out, 405, "method not allowed\n");
    }
  }
  wasi_keyvalue_store_bucket_drop_own(owned);
}

void exports_wasi_http_incoming_handler_handle(request_t req, outparam_t out) {
  char *path = request_path(req);
  if (strncmp(path, "/kv/", 4) == 0) {
    handle(req, out, path);
  } else {
    respond_text(out, 404, "try /kv/BUCKET/KEY\n");
  }
  free(path);
  wasi_http_types_incoming_request_drop_own(req);
}
