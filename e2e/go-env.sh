# Sourced by e2e/build-control-plane and e2e/build-node: the Go environment they build in, and the cleanup after.
#
# The binaries they build are the cache (keyed by version under ~/.cache/fedcrm), so Go's own caches only serve
# the next rebuild: after Kubernetes, its build cache holds about 7 GB and its extracted modules about 3 GB, on a
# disk that also holds a 6 GB image several times over. Unless the caller chose their own GOCACHE/GOMODCACHE,
# both live under ~/.cache/fedcrm/go; when a build succeeds the build cache and the extracted modules are
# removed and only the module downloads (under 1 GB, what a rebuild would fetch again) are kept.

command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && export PATH="/usr/local/go/bin:$PATH"; }
command -v go >/dev/null || { echo "error: go (1.26) is needed to build the Go binaries of the test harness; install it from your distribution or go.dev" >&2; exit 2; }
export GOTOOLCHAIN=local CGO_ENABLED=0
FEDCRM_GO="${FEDCRM_GO_CACHE:-$HOME/.cache/fedcrm/go}"
FEDCRM_GO_TRIM=0
if [ -z "${GOCACHE:-}" ] && [ -z "${GOMODCACHE:-}" ]; then
  FEDCRM_GO_TRIM=1
  export GOCACHE="$FEDCRM_GO/build" GOMODCACHE="$FEDCRM_GO/mod"
fi
export GOPATH="${GOPATH:-$FEDCRM_GO/path}" GOFLAGS="${GOFLAGS:+$GOFLAGS }-modcacherw"

# Call when every binary is built.
trim_go_caches() {
  [ "$FEDCRM_GO_TRIM" = 1 ] || return 0
  rm -rf "$GOCACHE"
  find "$GOMODCACHE" -mindepth 1 -maxdepth 1 ! -name cache -exec rm -rf {} + 2>/dev/null || true
  find "$GOMODCACHE/cache" -mindepth 1 -maxdepth 1 ! -name download -exec rm -rf {} + 2>/dev/null || true
}
