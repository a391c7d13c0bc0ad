#!/bin/sh
# A heap profile of the node host while W7 starts pods: which allocations a
# pod keeps. Runs W7's bench (containerd 2.3.4, Sandbox API) with the host
# started under heaptrack's preload library, then prints the allocations
# alive at the heap's peak (the last pod) by call site.
#
#   benches/heap-profile-node.sh [PODS] [OUT_DIR]      (defaults: 22, /tmp/shoal-heap-profile)
#
# Needs heaptrack (`apt-get install heaptrack`) and a release build
# (`cargo build --release --workspace --bins`). The whole profile stays in
# OUT_DIR/node-host.zst for `heaptrack_print` or `heaptrack --analyze`.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
pods=${1:-22}
out=${2:-/tmp/shoal-heap-profile}
lib=${HEAPTRACK_LIB:-/usr/lib/heaptrack}
[ -x "$lib/libexec/heaptrack_interpret" ] || { echo "heaptrack is not installed ($lib): apt-get install heaptrack" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out/pipe" "$out/node-host.zst"
mkfifo "$out/pipe"
# Only the node host (`shoal node ...`) is profiled; the shim's other uses
# of `shoal` run as they are.
cat > "$out/shoal" <<WRAPPER
#!/bin/sh
for arg in "\$@"; do
  [ "\$arg" = node ] && exec env LD_PRELOAD=$lib/libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=$out/pipe $root/target/release/shoal "\$@"
done
exec $root/target/release/shoal "\$@"
WRAPPER
chmod +x "$out/shoal"
"$lib/libexec/heaptrack_interpret" < "$out/pipe" | zstd -q -c > "$out/node-host.zst" &
cd "$root"
SHOAL_BENCH_WRAP_BIN="$out/shoal" SHOAL_BENCH_OUT="$out/w7.json" SHOAL_BENCH_PODS="$pods" \
  cargo bench -p shoal-cli --bench kubernetes
wait
heaptrack_print -f "$out/node-host.zst" --print-peaks 1 --print-allocators 0 --print-temporary 0 --peak-limit 25 -s 3
