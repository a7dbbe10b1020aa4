# Sourced by the bench scripts (run from the repository root): sets COREKV
# to the corekv binary to use, building one in release mode unless COREKV
# already names one, and exits 2 if there is none.
if [[ -z "${COREKV:-}" ]]; then
    echo "building corekv (release)" >&2
    cargo build --release -p corekv >&2
    COREKV="${CARGO_TARGET_DIR:-target}/release/corekv"
fi
[[ -x "$COREKV" ]] || {
    echo "no corekv binary at $COREKV" >&2
    exit 2
}
