#!/bin/sh
# Call mesh services with curl through the meshlib shim (docs/shim.md).
#
#   adapters/curl/example.sh [SERVICE] [PATH]        # default: orders /
#
# Needs a running shim (`python -m meshlib.shim --etcd ...`) with its outbound HTTP port on
# $MESHLIB_SHIM (default 127.0.0.1:15001) and a service registered under SERVICE.
set -eu
SHIM="${MESHLIB_SHIM:-127.0.0.1:15001}"
SERVICE="${1:-orders}"
PATH_="${2:-/}"

echo "# 1. the destination service in the Host header"
curl -sS -H "Host: $SERVICE" "http://$SHIM$PATH_"; echo

echo "# 2. the shim as a forward proxy (absolute-form request, as HTTP_PROXY clients send)"
HTTP_PROXY="http://$SHIM" http_proxy="http://$SHIM" curl -sS "http://$SERVICE$PATH_"; echo

echo "# 3. the same with -x, and a 500 ms deadline for the whole call (retries included)"
curl -sS -x "http://$SHIM" -H 'x-mesh-timeout: 500m' "http://$SERVICE$PATH_"; echo

echo "# 4. what the shim refuses: an IP literal is not a mesh service (no open proxy)"
curl -sS -o /dev/null -w '%{http_code}\n' -x "http://$SHIM" "http://169.254.169.254/" || true
