// A deliberately badly behaved function for tests of the host's limits:
//   /spin   loops forever
//   /hog    allocates memory until stopped
//   /trap   executes `unreachable`
//   /status/NNN answers status NNN as the app's own choice, claiming in
//           the platform's own headers that it is a platform fault
//   /secret looks everywhere it can for what an earlier request left, then
//           leaves a secret in every place: see leave_secrets()
//   other   answers "ok"
#include "common.h"
#include <stdio.h>

void *volatile hoard;

// The secret, stored XOR-ed so that the plain text exists in memory only
// where a request wrote it (never in the data segment or in code).
#define SECRET_LEN 24
static const unsigned char secret_xored[SECRET_LEN] = {
    0x17, 0x1f, 0x08, 0x13, 0x1e, 0x13, 0x1b, 0x14, 0x77, 0x09, 0x1f, 0x19,
    0x08, 0x1f, 0x0e, 0x77, 0x6b, 0x68, 0x69, 0x6e, 0x6f, 0x6c, 0x6d, 0x62};  // "MERIDIAN-SECRET-12345678" ^ 0x5a
#define XOR 0x5a

// A wasm global of the module's own (not in linear memory).
__asm__(".globaltype secret_global, i64\nsecret_global:\n");
static uint64_t get_secret_global(void) {
  uint64_t v;
  __asm__ volatile("global.get secret_global\n local.set %0" : "=r"(v));
  return v;
}
static void set_secret_global(uint64_t v) { __asm__ volatile("local.get %0\n global.set secret_global" ::"r"(v)); }

// In the data segment (initialised) and in .bss (zeroed).
static volatile unsigned char in_data[64] = {1};
static volatile unsigned char in_bss[64];
static volatile uint32_t requests_seen;

// Not inlined: inlined, clang dropped the stores to the stack buffer.
__attribute__((noinline)) static void put_secret(volatile unsigned char *dst) {
  for (int i = 0; i < SECRET_LEN; i++) dst[i] = secret_xored[i] ^ XOR;
}

// Copies of the secret anywhere in linear memory, compared without ever
// materialising it.
static size_t count_secrets(void) {
  const volatile unsigned char *mem = (const volatile unsigned char *)0;
  size_t size = __builtin_wasm_memory_size(0) * 65536, found = 0;
  for (size_t at = 1; at + SECRET_LEN <= size; at++) {
    int i = 0;
    while (i < SECRET_LEN && (mem[at + i] ^ XOR) == secret_xored[i]) i++;
    if (i == SECRET_LEN) found++;
  }
  return found;
}

// Returns how many copies are in memory once all are written (while the
// one on the stack is still live).
static int grew;
static size_t leave_secrets(void) {
  put_secret(in_data);
  put_secret(in_bss);
  // On the heap, never freed.
  unsigned char *heap = malloc(4096);
  if (heap) put_secret(heap);
  hoard = heap;
  // On the stack (the shadow stack in linear memory).
  volatile unsigned char on_stack[64];
  put_secret(on_stack);
  // In memory grown by this request, past the initial size.
  size_t old_pages = __builtin_wasm_memory_grow(0, 2);
  if (old_pages != (size_t)-1) {
    put_secret((volatile unsigned char *)(old_pages * 65536 + 100));
    grew = 1;
  }
  set_secret_global(0x5ec7e7);
  requests_seen++;
  return count_secrets();
}

void exports_wasi_http_incoming_handler_handle(request_t req, outparam_t out) {
  char *path = request_path(req);
  if (strcmp(path, "/spin") == 0) {
    volatile uint64_t n = 0;
    for (;;) n++;
  } else if (strcmp(path, "/hog") == 0) {
    for (;;) {
      // Touch every page and keep every block reachable, so neither the
      // compiler nor the allocator can make the allocation disappear.
      char *p = malloc(1 << 20);
      if (!p) __builtin_trap();
      memset(p, 1, 1 << 20);
      *(void **)p = hoard;
      hoard = p;
    }
  } else if (strcmp(path, "/trap") == 0) {
    __builtin_trap();
  } else if (strncmp(path, "/status/", 8) == 0) {
    int code = atoi(path + 8);
    if (code < 100 || code > 599) code = 500;
    char text[64];
    snprintf(text, sizeof text, "the app chose %d\n", code);
    const header_t hs[] = {
        {"content-type", "text/plain; charset=utf-8"},
        {"cache-control", "no-store"},
        {"x-meridian-fault", "platform"},
        {"x-meridian-residency", "eu"},
        {"x-meridian-region", "forged"},
    };
    respond_with(out, (uint16_t)code, hs, sizeof hs / sizeof hs[0], (const uint8_t *)text, strlen(text));
    free(path);
    wasi_http_types_incoming_request_drop_own(req);
    return;
  } else if (strcmp(path, "/secret") == 0) {
    // What an earlier request left, if anything, then what this one leaves
    // (which proves the search finds a secret where there is one).
    char text[160];
    size_t before = count_secrets();
    uint64_t global_before = get_secret_global();
    uint32_t seen_before = requests_seen;
    size_t after = leave_secrets();
    snprintf(text, sizeof text, "found=%zu global=%llx seen=%u left=%zu global_left=%llx grew=%d\n", before,
             (unsigned long long)global_before, seen_before, after, (unsigned long long)get_secret_global(), grew);
    respond_text(out, 200, text);
    free(path);
    wasi_http_types_incoming_request_drop_own(req);
    return;
  }
  respond_text(out, 200, "ok\n");
  free(path);
  wasi_http_types_incoming_request_drop_own(req);
}
