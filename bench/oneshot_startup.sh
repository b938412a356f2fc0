#!/usr/bin/env bash
# One-shot start to finish as a whole process: cold join (fresh storage) and warm renewal
# (stored identity), median/min/max of N runs, against `python -c pass` on the same
# interpreter. Usage: N=11 bash bench/oneshot_startup.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd); T=$ROOT/.venv/bin/tbot-py; PY=$ROOT/.venv/bin/python; N=${N:-11}
W=$(mktemp -d); trap 'kill $AUTH 2>/dev/null; rm -rf $W' EXIT
$T auth start --data-dir $W/auth --listen 127.0.0.1:0 > $W/ready 2>/dev/null & AUTH=$!
for i in $(seq 50); do [ -s $W/ready ] && break; sleep 0.1; done
ADDR=$($PY -c "import json;print(json.load(open('$W/ready'))['addr'])"); PIN=$($PY -c "import json;print(json.load(open('$W/ready'))['ca_pin'])")
ms() { local s e; s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(( (e-s)/1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)] " (min " a[1] ", max " a[NR] ")"}'; }
base=(); cold=(); warm=()
for i in $(seq $N); do base+=($(ms $PY -c pass)); done
for i in $(seq $N); do
  tok=$($T auth bots add b$i --roles access --data-dir $W/auth --format json | $PY -c "import json,sys;print(json.load(sys.stdin)['token'])")
  cold+=($(TELEPORT_BOT_TOKEN=$tok ms $T start identity --proxy-server $ADDR --ca-pin $PIN --destination $W/o$i --storage $W/s$i --oneshot))
done
for i in $(seq $N); do warm+=($(ms $T start identity --proxy-server $ADDR --destination $W/o1 --storage $W/s1 --oneshot)); done
echo "python -c pass : $(printf '%s\n' "${base[@]}" | median) ms"
echo "cold join      : $(printf '%s\n' "${cold[@]}" | median) ms"
echo "warm renewal   : $(printf '%s\n' "${warm[@]}" | median) ms"
