#!/bin/sh
# Install Shoal on a node: put `shoal` and `containerd-shim-shoal-v1` in
# the binary directory, add the `shoal` runtime to containerd's config and
# restart containerd. Config versions 2 (containerd 1.x, also read by 2.x),
# 3 and 4 (containerd 2.x; 4 is what 2.3 writes) are known. Where the config
# imports a drop-in folder (containerd 2.x's default config imports
# /etc/containerd/conf.d/*.toml) the runtime goes into a file of its own
# there, shoal.toml, and the operator's config is not edited; otherwise it
# is appended to the config (the previous file kept beside it). On
# containerd 2.x the runtime owns its pods' sandboxes (sandboxer = "shim":
# containerd's Sandbox API, no pause container). Safe to run again: a config
# that already names the runtime is left alone; the drop-in is rewritten.
#
# Run on the node itself (sudo ./install.sh), or from the DaemonSet in
# daemonset.yaml, which mounts the node's / at $SHOAL_HOST_ROOT.
#
# Settings (environment):
#   SHOAL_HOST_ROOT          the node's / as this script sees it ("")
#   SHOAL_CONTAINERD_CONFIG  containerd's config ($ROOT/etc/containerd/config.toml)
#   SHOAL_CONTAINERD         the node's containerd binary, asked for its version and,
#                            when there is no config yet, its default config (run as
#                            named; unset: `containerd`, in the node's namespaces when
#                            $ROOT is set)
#   SHOAL_SANDBOXER          on containerd 2.x: "shim" (the default: Shoal serves the
#                            Sandbox API) or "podsandbox" (containerd's pause containers)
#   SHOAL_BIN_DIR            where the binaries go ($ROOT/usr/local/bin)
#   SHOAL_SOURCE_DIR         where the binaries are (this script's folder)
#   SHOAL_RESTART            "no": do not restart containerd
#   SHOAL_RUN_DIR            where running node hosts keep their sockets
#                            ($ROOT/run/shoal); each is handed over to the new
#                            binary (`shoal node --upgrade`), its pods running on
#   SHOAL_UPGRADE            "no": leave running node hosts on their binary
#   SHOAL_END_PROGRAMS_AFTER how long running wasi:cli programs and execs may take to
#                            end before an upgrade ends them (e.g. 60s; unset: they
#                            refuse the upgrade)
#   SHOAL_POLICY_SOURCE      the node policy to install ($SRC/policy.toml, or the
#                            shoal-policy ConfigMap the DaemonSet mounts)
#   SHOAL_POLICY             where the node host reads it ($ROOT/etc/shoal/policy.toml)
#   NODE_NAME                label this node shoal.dev/runtime=true (needs kubectl)
#
# `install.sh --watch-policy` only keeps the node's policy in step with
# SHOAL_POLICY_SOURCE (every 10 s; the node host picks changes up itself).
set -eu

ROOT="${SHOAL_HOST_ROOT:-}"
CONFIG="${SHOAL_CONTAINERD_CONFIG:-$ROOT/etc/containerd/config.toml}"
BIN_DIR="${SHOAL_BIN_DIR:-$ROOT/usr/local/bin}"
SRC="${SHOAL_SOURCE_DIR:-$(dirname "$0")}"
RESTART="${SHOAL_RESTART:-yes}"

say() { echo "shoal-install: $*"; }
fail() { echo "shoal-install: error: $*" >&2; exit 1; }

POLICY_SOURCE="${SHOAL_POLICY_SOURCE:-$SRC/policy.toml}"
POLICY="${SHOAL_POLICY:-$ROOT/etc/shoal/policy.toml}"

# Copy the policy into place when it differs (written aside, then renamed:
# the node host never reads half a file).
sync_policy() {
    [ -f "$POLICY_SOURCE" ] || return 0
    if [ -f "$POLICY" ] && cmp -s "$POLICY_SOURCE" "$POLICY"; then
        return 0
    fi
    mkdir -p "$(dirname "$POLICY")"
    cp "$POLICY_SOURCE" "$POLICY.new"
    mv -f "$POLICY.new" "$POLICY"
    say "installed the node policy $POLICY"
}

if [ "${1:-}" = "--watch-policy" ]; then
    while true; do
        sync_policy
        sleep 10
    done
fi

# 1. Binaries.
installed=0
for bin in shoal containerd-shim-shoal-v1; do
    if [ -f "$SRC/$bin" ]; then
        mkdir -p "$BIN_DIR"
        cp "$SRC/$bin" "$BIN_DIR/$bin.new"
        chmod 0755 "$BIN_DIR/$bin.new"
        mv -f "$BIN_DIR/$bin.new" "$BIN_DIR/$bin"
        installed=$((installed + 1))
        say "installed $BIN_DIR/$bin"
    fi
done
[ "$installed" -eq 2 ] || [ "$installed" -eq 0 ] || fail "found only one of shoal, containerd-shim-shoal-v1 in $SRC"
[ "$installed" -eq 2 ] || say "no binaries in $SRC; configuring containerd only"

# 1b. Running node hosts move to the new binary; their pods keep running
#     and containerd sees no task exit. A host that cannot hand over serves
#     on with its old binary (and says why).
#     From the DaemonSet ($ROOT set) the new binary runs in the node's own
#     namespaces, as systemctl does below: it is linked against the node's
#     libc, which this image does not have.
RUN_DIR="${SHOAL_RUN_DIR:-$ROOT/run/shoal}"
upgrade() {
    if [ -n "$ROOT" ]; then
        nsenter --target 1 --mount --uts --ipc --net --pid -- \
            "${BIN_DIR#"$ROOT"}/shoal" node --upgrade --run-dir "${RUN_DIR#"$ROOT"}" \
            ${SHOAL_END_PROGRAMS_AFTER:+--end-programs-after "$SHOAL_END_PROGRAMS_AFTER"}
    else
        "$BIN_DIR/shoal" node --upgrade --run-dir "$RUN_DIR" \
            ${SHOAL_END_PROGRAMS_AFTER:+--end-programs-after "$SHOAL_END_PROGRAMS_AFTER"}
    fi
}
# Whether a node host runs (its upgrade socket is there); a shell glob, as
# the installer image has no `ls`.
hosts_running() {
    for socket in "$RUN_DIR"/*.upgrade; do
        [ -e "$socket" ] && return 0
    done
    return 1
}
upgrade_failed=0
if [ "$installed" -eq 2 ] && [ "${SHOAL_UPGRADE:-yes}" = "yes" ] && hosts_running; then
    if upgrade; then
        say "running node hosts now run the new binary"
    else
        upgrade_failed=1
        say "a running node host was not upgraded; it serves on with its old binary (run again to retry)"
    fi
fi

# 2. containerd's config.
# The node's containerd: its major version, and its default config.
node_containerd() {
    if [ -n "${SHOAL_CONTAINERD:-}" ]; then
        "$SHOAL_CONTAINERD" "$@"
    elif [ -n "$ROOT" ]; then
        nsenter --target 1 --mount --uts --ipc --net --pid -- containerd "$@"
    else
        containerd "$@"
    fi
}
major=$( (node_containerd --version 2>/dev/null || true) | sed -n 's/.* v\{0,1\}\([0-9][0-9]*\)\.[0-9][0-9]*\.[0-9].*/\1/p' | head -n 1)
if [ ! -f "$CONFIG" ]; then
    mkdir -p "$(dirname "$CONFIG")"
    # containerd 2.x reads the drop-in folder only through its config's
    # `imports`: start from its own default config, which has them.
    if [ "$major" = 2 ] && node_containerd config default > "$CONFIG.new" 2>/dev/null && [ -s "$CONFIG.new" ]; then
        mv -f "$CONFIG.new" "$CONFIG"
        say "created $CONFIG from containerd's default config"
    else
        rm -f "$CONFIG.new"
        echo "version = 2" > "$CONFIG"
        say "created $CONFIG (config version 2)"
    fi
fi
version=$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$CONFIG" | head -n 1)
case "$version" in
    2) table='plugins."io.containerd.grpc.v1.cri".containerd.runtimes.shoal' ;;
    3|4) table='plugins."io.containerd.cri.v1.runtime".containerd.runtimes.shoal' ;;
    "") fail "$CONFIG has no 'version = 2', 'version = 3' or 'version = 4' line (config version 1 is not supported)" ;;
    *) fail "$CONFIG has config version $version; Shoal knows versions 2, 3 and 4" ;;
esac
# containerd 2.x: Shoal owns its pods' sandboxes (containerd 1.x has no
# Sandbox API, and a version 3 or 4 config is containerd 2.x's).
sandboxer=""
if [ "$major" = 2 ] || [ "$version" -ge 3 ]; then
    case "${SHOAL_SANDBOXER:-shim}" in
        shim|podsandbox) sandboxer="${SHOAL_SANDBOXER:-shim}" ;;
        *) fail "SHOAL_SANDBOXER=${SHOAL_SANDBOXER} is neither shim nor podsandbox" ;;
    esac
fi
runtime_table() {
    echo "[$table]"
    echo "  runtime_type = \"io.containerd.shoal.v1\""
    [ -z "$sandboxer" ] || echo "  sandboxer = \"$sandboxer\""
    echo "  pod_annotations = [\"shoal.dev/*\"]"
    echo "  container_annotations = [\"shoal.dev/*\"]"
}
# The drop-in folder the config imports (a `*.toml` glob), if any; as the
# node names it.
dropin_dir=$(sed -n 's/^[[:space:]]*imports[[:space:]]*=[[:space:]]*\[\(.*\)\].*/\1/p' "$CONFIG" | head -n 1 \
    | tr ',' '\n' | sed -n "s/^[[:space:]]*[\"']\(.*\)\/\*\.toml[\"'][[:space:]]*$/\1/p" | head -n 1)
if grep -qF "[$table]" "$CONFIG"; then
    say "$CONFIG already has the shoal runtime"
elif [ -n "$dropin_dir" ]; then
    dropin="$ROOT$dropin_dir/shoal.toml"
    mkdir -p "$(dirname "$dropin")"
    {
        echo "# Written by Shoal's installer (rewritten on every install): wasm pods with runtimeClassName: shoal."
        echo "version = $version"
        echo ""
        runtime_table
    } > "$dropin.new"
    mv -f "$dropin.new" "$dropin"
    say "wrote the shoal runtime to $dropin (imported by $CONFIG, config version $version${sandboxer:+, sandboxer $sandboxer})"
else
    cp -p "$CONFIG" "$CONFIG.before-shoal"
    {
        echo ""
        echo "# Added by Shoal's installer: wasm pods with runtimeClassName: shoal."
        runtime_table
    } >> "$CONFIG"
    say "added the shoal runtime to $CONFIG (config version $version${sandboxer:+, sandboxer $sandboxer}; previous file kept as $CONFIG.before-shoal)"
fi

# 3. The node policy (without one the built-in policy applies: no egress).
sync_policy

# 4. Restart containerd (running pods keep running: their shims and the
#    Shoal host are not children of containerd).
if [ "$RESTART" = "yes" ]; then
    if [ -n "$ROOT" ]; then
        nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd
    else
        systemctl restart containerd
    fi
    say "restarted containerd"
fi

# 5. Tell the scheduler.
if [ -n "${NODE_NAME:-}" ] && command -v kubectl >/dev/null 2>&1; then
    kubectl label node "$NODE_NAME" shoal.dev/runtime=true --overwrite
fi
[ "$upgrade_failed" -eq 0 ] || fail "installed, but a running node host was not upgraded (see above)"
say "done"
