// A deliberately badly behaved function for tests of the host's limits:
//   /spin   loops forever
//   /hog    allocates memory until stopped
//   /trap   executes `unreachable`
//   other   answers "ok"
#include "common.h"

void *volatile hoard;

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
  }
  respond_text(out, 200, "ok\n");
  free(path);
  wasi_http_types_incoming_request_drop_own(req);
}
