#!/bin/sh
# Print the folder where cargo unpacked crate $1 at version $2 from
# crates.io, fetching it if need be (`cargo metadata` on a throwaway
# manifest that depends on exactly that version; nothing is built).
# The Makefile takes two things from crates this way: the Go package
# wit-bindgen's Go bindings import, and the WASI preview1 reactor adapter.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 CRATE VERSION" >&2; exit 2; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf '[package]\nname = "crate-dir"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n[lib]\npath = "lib.rs"\n[dependencies]\n%s = "=%s"\n[workspace]\n' \
	"$1" "$2" >"$dir/Cargo.toml"
: >"$dir/lib.rs"
${CARGO:-cargo} metadata --quiet --format-version 1 --manifest-path "$dir/Cargo.toml" >"$dir/metadata.json"
python3 -c '
import json, os, sys
name, version = sys.argv[1:3]
found = [os.path.dirname(p["manifest_path"]) for p in json.load(open(sys.argv[3]))["packages"]
         if p["name"] == name and p["version"] == version]
if not found:
    sys.exit(f"crate {name} {version} not found")
print(found[0])' "$1" "$2" "$dir/metadata.json"
