#!/usr/bin/env bash
# Set-up and demo in one command: installs hindsight-py and what it needs, starts a local
# Elasticsearch 8 (127.0.0.1:39200, plus HINDSIGHT_PY_PORT_OFFSET if set), and ships examples/cloudtrail-sample.ndjson (1,000 CloudTrail
# records, one per line, as CloudTracker's recipe makes them) into the index `cloudtrail` with the
# project's run/ -- the same hindsight.cfg and plugins a Hindsight user already has.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

# javac builds the small GET / module of the Elasticsearch test distribution (search_servers.py)
bash scripts/install_debian_packages.sh lua-lpeg lua-cjson lua-socket lua-filesystem lua-zlib lua-bitop maven openjdk-17-jdk-headless
"$PYTHON" -m pip install -q -e .

url=$("$PYTHON" scripts/search_servers.py start es8 | tail -n 1)
echo "Elasticsearch: $url"

# A working directory laid out as a Hindsight user's: hindsight.cfg beside run/.
work=$repo/demo
rm -rf "$work"
mkdir -p "$work"
cp -r run "$work/run"
cp run/hindsight.cfg "$work/hindsight.cfg"
sed -i "s|^input_filename.*|input_filename = \"$repo/examples/cloudtrail-sample.ndjson\"|" "$work/run/input/file.cfg"
sed -i "s|^port .*|port = ${url##*:}|" "$work/run/output/elasticsearch_bulk_api.cfg"
curl -s -X DELETE "$url/cloudtrail" >/dev/null || true

cd "$work"
echo "+ hindsight_cli hindsight.cfg   (in $work)"
hindsight_cli hindsight.cfg
curl -s -X POST "$url/cloudtrail/_refresh" >/dev/null
echo
echo "documents in $url/cloudtrail: $(curl -s "$url/cloudtrail/_count" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["count"])') (input lines: $(wc -l < "$repo/examples/cloudtrail-sample.ndjson"))"
echo "top event names:"
curl -s -H 'Content-Type: application/json' "$url/cloudtrail/_search" \
    -d '{"size":0,"aggs":{"e":{"terms":{"field":"eventName.keyword","size":5}}}}' |
    "$PYTHON" -c 'import json,sys; [print("  %5d  %s" % (b["doc_count"], b["key"])) for b in json.load(sys.stdin)["aggregations"]["e"]["buckets"]]'
echo "Run it again: nothing is shipped twice (checkpoints in $work/output/hindsight.cp)."
