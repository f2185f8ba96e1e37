#!/usr/bin/env bash
# The GPU measurements of issues 3 and 4 as job groups for the device tool (10 minutes at most per call, 30 minutes
# of device time per session). Run `bash benchmarks/device_bundle.sh` here first and carry `.devdata`. One call runs
# the groups it names, all their jobs at once on the one GPU, each under `timeout $DEADLINE` (default 540 s) so the
# call ends inside its limit with whatever finished; EXTRA adds arguments to every ablation job (a run that did not finish leaves no JSON: they are written
# atomically at the end). It writes $OUT/results.tgz (the result JSONs, under ablation-h100/, fast-vs-plain-h100/ or
# speed-h100*.json), $OUT/session.log (GPU, versions, the tail of every job's output) and, for speed, $OUT/profile.txt.
#
#   speed           speed.py: plain vs fast training and inference, efficientnet_b4 224 px (random weights), the
#                   fast path also eager; a torch.profiler table of 20 fast steps. Run it alone, first.
#   table4a-light   ablation rows 0, 1, 2, seed 133, 180 epochs (no synthesis: the cached features only); row 0 with
#                   its curve (test metrics every 20 epochs); row 2 also scored with other prompts (--sensitivity)
#   table4a-heavy   rows 3, 4, 5, seed 133 (synthesis, backbone on every synthetic image); row 5 with its curve and
#                   K = 1, 3, 5 and --sensitivity
#   seeds0, seeds5  rows 0 / 5 with seeds 134 and 135 (and curves): mean +- std over three seeds
#   px256           row 5 at 256 px
#   fastvsplain     row 5, 60 epochs, seeds 1-3, on the plain and on the fast engine (the plain path's data loading
#                   takes the CPU cores: run it without other groups)
#
#   bash benchmarks/gpu_session.sh speed
#   bash benchmarks/gpu_session.sh table4a-light table4a-heavy
#
# Here: `tar xzf <files_at>/results.tgz -C docs/results/`, then `python benchmarks/render_results.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
(($#)) || { echo "name one or more groups: speed table4a-light table4a-heavy seeds0 seeds5 px256 fastvsplain" >&2; exit 2; }
OUT=${OUT:?OUT must name the folder whose files come back}
DEADLINE=${DEADLINE:-540}
EXTRA=${EXTRA:-}  # more ablation.py arguments for every job (later ones win), e.g. "--set train.compile=none"
D=.devdata
export PYTHONUNBUFFERED=1
DATA="--data $D/iad-mix --textures $D/textures"
A="$DATA --weights $D/lite0.safetensors --engine fast --epochs 180 --workers 2"
res=$(mktemp -d)
log="$OUT/session.log"
{ nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
  nproc; git log --oneline -1 2>/dev/null; } >"$log" 2>&1

jobs=()  # pairs: name, ablation.py arguments
for group in "$@"; do
  case $group in
  speed) ;;
  table4a-light)
    o="--output $res/ablation-h100"
    jobs+=(r0 "$A $o --rows 0 --seeds 133 --curve-every 20" r1 "$A $o --rows 1 --seeds 133" r2 "$A $o --rows 2 --seeds 133 --sensitivity") ;;
  table4a-heavy)
    o="--output $res/ablation-h100"
    jobs+=(r3 "$A $o --rows 3 --seeds 133" r4 "$A $o --rows 4 --seeds 133"
      r5 "$A $o --rows 5 --seeds 133 --curve-every 20 --prompts 1 3 5 --sensitivity") ;;
  seeds0 | seeds5)
    o="--output $res/ablation-h100" row=${group#seeds}
    jobs+=("s${row}a" "$A $o --rows $row --seeds 134 --curve-every 20" "s${row}b" "$A $o --rows $row --seeds 135 --curve-every 20") ;;
  px256)
    jobs+=(p256 "$A --output $res/ablation-h100 --rows 5 --seeds 133 --input-size 256 --tag 256px") ;;
  fastvsplain)
    B="$DATA --weights $D/lite0.safetensors --epochs 60 --rows 5 --output $res/fast-vs-plain-h100"
    for s in 1 2 3; do
      jobs+=("plain$s" "$B --engine plain --workers 4 --seeds $s --tag plain" "fast$s" "$B --engine fast --workers 0 --seeds $s --tag fast")
    done ;;
  *) echo "unknown group $group" >&2; exit 2 ;;
  esac
done

if [[ " $* " == *" speed "* ]]; then
  mkdir -p "$res/speed" "$res/speed-eager"
  timeout $((DEADLINE * 7 / 10)) python3 benchmarks/speed.py $DATA --workers 14 --profile 20 --output "$res/speed" >>"$log" 2>&1
  cp "$res/speed/speed.json" "$res/speed-h100.json" && cp "$res/speed/profile.txt" "$OUT/profile.txt"
  # the fast path without torch.compile (eager), for what compiling buys
  timeout $((DEADLINE * 3 / 10)) python3 benchmarks/speed.py $DATA --workers 14 --engines fast --compile none --infer-compile none \
    --output "$res/speed-eager" >>"$log" 2>&1 && cp "$res/speed-eager/speed.json" "$res/speed-h100-eager.json"
fi

pids=()
for ((i = 0; i < ${#jobs[@]}; i += 2)); do
  # shellcheck disable=SC2086
  timeout "$DEADLINE" python3 benchmarks/ablation.py ${jobs[i + 1]} $EXTRA >"$res/${jobs[i]}.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

for f in "$res"/*.txt; do [ -e "$f" ] && { echo "== $(basename "$f")"; tail -n 20 "$f"; }; done >>"$log"
(cd "$res" && { ls speed-h100*.json 2>/dev/null; find . -mindepth 2 -maxdepth 2 -name '*.json' -not -path './speed*'; } | tar czf "$OUT/results.tgz" -T -)
{ nvidia-smi --query-gpu=memory.used --format=csv; tar tzf "$OUT/results.tgz"; } >>"$log" 2>&1
