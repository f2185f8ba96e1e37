#!/usr/bin/env bash
# The GPU measurements of issues 3 and 4 as job groups, one group per call of the device tool.
#
# Budget: a session that is lent a GPU has 15 minutes of device time in all, the machine's start (1-2 minutes)
# included, and no machine starts with under 4 minutes left. So a session gets ONE full call: run
#
#   bash benchmarks/device_bundle.sh                      # here, once per checkout: .devdata/ (about 62 MB)
#   device run, carry [".devdata"], timeout_s 600:  bash benchmarks/gpu_session.sh next
#
# `next` takes the first group, in the order below, whose result files are not yet in docs/results/ (they travel
# with the working tree), so every session with a GPU measures the next missing piece; when that group is speed,
# the group after it follows in the same call, with the jobs that fit in the time speed leaves at its measured
# rate. `DRY_RUN=1 GPU_TAG=h200 bash
# benchmarks/gpu_session.sh next` prints what it would run on an H200, here, at no device time (without a GPU the
# script needs GPU_TAG to name its results). What travels is the tracked tree
# (3.3 MB at commit 2715281) and .devdata (62.0 MB): 62.3 MiB of the 64 MiB allowed, so keep anything bulky
# git-ignored and check `du -cb` of both before a call.
#
# DEADLINE (default 540 s) is the whole call's budget, counted from the script's start: the speed runs and then all
# ablation jobs at once on the one GPU, each job under `timeout` for what is left of it (none starts with under
# MIN_JOB = 120 s left), so the call ends inside the device tool's 600 s with whatever finished. A job that did not
# finish leaves no JSON (written atomically at the end), and there is no resuming across machines (a checkpoint is
# over the 16 MB a returned file may have). A job whose result is already in docs/results/ does not run (FORCE=1
# reruns it). EXTRA adds arguments to every ablation job (later ones win), e.g. EXTRA="--set train.compile=none".
#
# Groups, in `next` order (result folders are named for the GPU: ablation-h200/, speed-h200.json, ...):
#   speed           speed.py: plain vs fast training and inference, efficientnet_b4 224 px (random weights), the
#                   fast path also eager; a torch.profiler table of 20 fast steps. The fast engine's first run on
#                   CUDA: if it crashes before training, the ablation jobs of the call run on the plain engine
#                   (logged; each JSON records its engine). If profile.txt shows the synthesis's many small
#                   kernels limiting a step, try `speed.py --compile-synthesis default` (train.compile_synthesis;
#                   in no group yet, since it compiles for minutes). Alone: it is timed. Its fast
#                   training rate says whether the heavy groups fit: one heavy row is 180 x 1,519 = 273k query
#                   images (plus synthesis), so at R images/s about 273k/R seconds alone, more when run together.
#   table4a-light   ablation rows 0, 1, 2, seed 133, 180 epochs (no synthesis: the cached features only); row 0 with
#                   its curve (test metrics every 20 epochs); row 2 also scored with other prompts (--sensitivity)
#   table4a-heavy   rows 3, 4, 5, seed 133 (synthesis, backbone on every synthetic image); row 5 with its curve and
#                   K = 1, 3, 5 and --sensitivity
#   line            row 5, seed 133, with the line network (2 + 2 layers, width 128, ffn 512, 4 heads, refiner 64:
#                   the smallest change that meets the CPU goal of 8 ms / 200 images/s in benchmarks/line_network.py,
#                   untrained); its accuracy against row 5's, and its model back for cpu_speed.py's parity
#   seeds5, seeds0  rows 5 / 0 with seeds 134 and 135 (and curves): mean +- std over three seeds
#   px256           row 5 at 256 px
#   fastvsplain     row 5, 60 epochs, seeds 1-3, on the plain and on the fast engine (the plain path's data loading
#                   takes the CPU cores: run it without other groups)
#   row:R:S         one ablation job, row R with seed S, as its group would run it (row 5 seed 133 with K and
#                   sensitivity; curves for rows 0 and 5): for when a group's rows do not fit one call together
#
#   bash benchmarks/gpu_session.sh next
#   bash benchmarks/gpu_session.sh speed
#   bash benchmarks/gpu_session.sh row:3:133 row:4:133
#
# After the jobs, in the time left: prompt-map fusion (benchmarks/prompt_fusion.py) of every row-5 model trained.
# It writes $OUT/results.tgz (the result JSONs: ablation-<gpu>/, fast-vs-plain-<gpu>/, prompt-fusion-<gpu>/,
# speed-<gpu>*.json),
# $OUT/session.log (GPU, versions, the tail of every job's output), for speed, $OUT/profile.txt, and when full
# OneNIP's seed 133 trained, its model as $OUT/model-row5-seed133.safetensors (for the CPU runtimes' parity), and the
# line network's as $OUT/model-line-row5-seed133.safetensors.
# Here: `tar xzf <files_at>/results.tgz -C docs/results/`, then `python benchmarks/render_results.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
ORDER=(speed table4a-light table4a-heavy line seeds5 seeds0 px256 fastvsplain)
# the line network (benchmarks/line_network.py)
LINE="--set model.encoder_layers=2 --set model.decoder_layers=2 --set model.hidden_dim=128 --set model.ffn_dim=512 --set model.heads=4 --set model.refiner_channels=64"
(($#)) || { echo "name one or more groups: next ${ORDER[*]} row:R:S" >&2; exit 2; }
DRY_RUN=${DRY_RUN:-0}
if ((DRY_RUN)); then OUT=${OUT:-/tmp}; fi
OUT=${OUT:?OUT must name the folder whose files come back}
DEADLINE=${DEADLINE:-540}
MIN_JOB=${MIN_JOB:-120}
EXTRA=${EXTRA:-}
# The GPU's short name names the result folders: "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100.
GPU=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | awk '{print tolower($2)}' | cut -d- -f1)}
[[ -n $GPU ]] || { echo "no GPU found (nvidia-smi): this is for the device machine; GPU_TAG=NAME names the results elsewhere" >&2; exit 2; }
D=.devdata
R=docs/results
[[ -d $D/iad-mix && -d $D/textures && -f $D/lite0.safetensors ]] ||
  { echo "$D/ is incomplete: run 'bash benchmarks/device_bundle.sh' here and carry .devdata" >&2; exit 2; }
export PYTHONUNBUFFERED=1
# The commit every result records: git's where .git travelled, else the one device_bundle.sh wrote (or ONENIP_COMMIT).
ONENIP_COMMIT=${ONENIP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat $D/COMMIT 2>/dev/null || echo unknown)}
export ONENIP_COMMIT
DATA="--data $D/iad-mix --textures $D/textures"
A="$DATA --weights $D/lite0.safetensors --engine fast --epochs 180 --workers 2"

# A job runs only if its result is not in docs/results/ yet (FORCE=1: always), so a group half measured in an
# earlier session runs its missing jobs alone and a result already here is never replaced by a rerun.
wanted() { ((${FORCE:-0})) || [[ ! -e $R/$1 ]]; }
# One ablation job of a group: row, seed, and the extras its group gives it.
job() {
  local row=$1 seed=$2 extra=""
  wanted "ablation-$GPU/row$row-seed$seed.json" || return 0
  [[ $row == 0 || $row == 5 ]] && extra="--curve-every 20"
  [[ $row == 2 && $seed == 133 ]] && extra="--sensitivity"
  [[ $row == 5 && $seed == 133 ]] && extra="$extra --prompts 1 3 5 --sensitivity"
  jobs+=("r$row-s$seed" "$A --output $res/ablation-$GPU --rows $row --seeds $seed $extra")
}
# Queue the jobs of one group that are still wanted; true when it queued any (what `next` asks of each group).
add() {
  local before=$((${#jobs[@]} + speed))
  case $1 in
  speed) ! wanted "speed-$GPU.json" || speed=1 ;;
  table4a-light) job 0 133; job 1 133; job 2 133 ;;
  table4a-heavy) job 3 133; job 4 133; job 5 133 ;;
  seeds0 | seeds5) job "${1#seeds}" 134; job "${1#seeds}" 135 ;;
  line) ! wanted "ablation-$GPU/line-row5-seed133.json" ||
    jobs+=(line "$A --output $res/ablation-$GPU --rows 5 --seeds 133 --tag line $LINE") ;;
  px256) ! wanted "ablation-$GPU/256px-row5-seed133.json" ||
    jobs+=(p256 "$A --output $res/ablation-$GPU --rows 5 --seeds 133 --input-size 256 --tag 256px") ;;
  fastvsplain)
    local B="$DATA --weights $D/lite0.safetensors --epochs 60 --rows 5 --output $res/fast-vs-plain-$GPU" s
    for s in 1 2 3; do
      ! wanted "fast-vs-plain-$GPU/plain-row5-seed$s.json" || jobs+=("plain$s" "$B --engine plain --workers 4 --seeds $s --tag plain")
      ! wanted "fast-vs-plain-$GPU/fast-row5-seed$s.json" || jobs+=("fast$s" "$B --engine fast --workers 0 --seeds $s --tag fast")
    done ;;
  row:[0-5]:[0-9]*) local _ row seed; IFS=: read -r _ row seed <<<"$1"; job "$row" "$seed" ;;
  *) echo "unknown group $1 (groups: next ${ORDER[*]} row:R:S)" >&2; exit 2 ;;
  esac
  ((${#jobs[@]} + speed > before))
}
res=$(mktemp -d)
jobs=()  # pairs: name, ablation.py arguments
speed=0
groups=()
for group in "$@"; do
  if [[ $group != next ]]; then
    add "$group"
    groups+=("$group")
    continue
  fi
  for g in "${ORDER[@]}"; do  # the first group with something left; after speed, the next one too
    add "$g" || continue
    groups+=("$g")
    [[ $g == speed ]] || break
  done
done

((speed || ${#jobs[@]})) || { echo "nothing to run: the results of ${groups[*]:-every group} are in $R/ for $GPU (FORCE=1 reruns)" >&2; rm -rf "$res"; exit 0; }

if ((DRY_RUN)); then
  echo "GPU tag: $GPU; groups: ${groups[*]}; ${DEADLINE} s for the call"
  ((speed)) && echo "speed: python3 benchmarks/speed.py $DATA --workers 14 --profile 20 (then the fast path eager)"
  for ((i = 0; i < ${#jobs[@]}; i += 2)); do echo "${jobs[i]}: python3 benchmarks/ablation.py ${jobs[i + 1]} $EXTRA"; done
  echo "then, in the time left, each row-5 model trained: python3 benchmarks/prompt_fusion.py --models RUN --threads 14"
  rm -rf "$res"
  exit 0
fi

log="$OUT/session.log"
{ echo "groups: ${groups[*]} (GPU tag $GPU)"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
  nproc; echo "commit $ONENIP_COMMIT"; } >"$log" 2>&1

if ((speed)); then
  mkdir -p "$res/speed" "$res/speed-eager"
  timeout $((DEADLINE * 7 / 10 - SECONDS)) python3 benchmarks/speed.py $DATA --workers 14 --profile 20 --output "$res/speed" >>"$log" 2>&1
  rc=$?
  cp "$res/speed/speed.json" "$res/speed-$GPU.json" && cp "$res/speed/profile.txt" "$OUT/profile.txt"
  # The fast engine first runs on CUDA here. If it crashed before its training rate was printed (not a timeout), the
  # ablation jobs of this call would crash the same way: they run on the plain engine instead, and the log says so
  # (each result JSON records its engine).
  if ((rc != 0 && rc != 124)) && ! grep -q '^fast: training' "$log"; then
    echo "speed.py failed (exit $rc) before the fast engine trained: the ablation jobs run with --engine plain" >>"$log"
    EXTRA="$EXTRA --engine plain --workers 4"
  fi
  # the fast path without torch.compile (eager), for what compiling buys
  t=$((DEADLINE - SECONDS)) && ((t > DEADLINE * 3 / 10)) && t=$((DEADLINE * 3 / 10))
  ((t > 0)) && timeout "$t" python3 benchmarks/speed.py $DATA --workers 14 --engines fast --compile none --infer-compile none \
    --output "$res/speed-eager" >>"$log" 2>&1 && cp "$res/speed-eager/speed.json" "$res/speed-$GPU-eager.json"
fi

pids=()
left=$((DEADLINE - SECONDS))
# After speed, plan from its measured rate: one job trains 180 epochs of 1,519 query images (and its synthesis, which
# the rate includes); jobs run together on the one GPU, so together they take about the sum of their times. Only the
# jobs that fit in what is left start (none when the rate is unknown); the others stay for the next call.
if ((speed && ${#jobs[@]})); then
  rate=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['rows']['fast']['train_images_per_s']))" \
    "$res/speed-$GPU.json" 2>/dev/null || echo 0)
  if ((rate <= 0)); then
    echo "no fast training rate from speed: the ablation jobs wait for the next call" >>"$log"; jobs=()
  else
    per_job=$((180 * 1519 / rate + 60))  # + start-up and evaluation
    fit=$((left / per_job))
    ((fit * 2 < ${#jobs[@]})) && {
      echo "speed measured $rate query img/s: a job takes about $per_job s, $fit of $((${#jobs[@]} / 2)) fit in $left s" >>"$log"
      jobs=("${jobs[@]:0:$((fit * 2))}"); }
  fi
fi
((${#jobs[@]} && left < MIN_JOB)) && { echo "only $left s left: the ablation jobs do not start" >>"$log"; jobs=(); }
((${#jobs[@]})) && echo "ablation jobs start with $left s left" >>"$log"
for ((i = 0; i < ${#jobs[@]}; i += 2)); do
  # shellcheck disable=SC2086
  timeout "$left" python3 benchmarks/ablation.py ${jobs[i + 1]} $EXTRA >"$res/${jobs[i]}.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

# Prompt-map fusion on trained types (issue 28's full-scale question): every full-OneNIP model (row 5) this call
# trained, in the time left, on this machine's CPU cores (benchmarks/prompt_fusion.py; ~3 min at 2 threads here).
for model in $(find "$res" -path '*/row5-seed*/model.safetensors' -not -path '*line*' -not -path '*256px*' 2>/dev/null); do
  name=$(grep -o 'row5-seed[0-9]*' <<<"$model" | tail -n 1)
  t=$((DEADLINE - SECONDS))
  ((t >= MIN_JOB)) || { echo "prompt fusion of $name: only $t s left, not run" >>"$log"; continue; }
  mkdir -p "$res/prompt-fusion-$GPU"
  timeout "$t" python3 benchmarks/prompt_fusion.py --models "$(dirname "$model")" --threads 14 \
    --output "$res/prompt-fusion-$GPU/$name.json" >"$res/fusion-$name.txt" 2>&1
done
for f in "$res"/*.txt; do [ -e "$f" ] && { echo "== $(basename "$f")"; tail -n 20 "$f"; }; done >>"$log"
(cd "$res" && { ls speed-*.json 2>/dev/null; find . -mindepth 2 -maxdepth 2 -name '*.json' -not -path './speed*'; } | tar czf "$OUT/results.tgz" -T -)
{ nvidia-smi --query-gpu=memory.used --format=csv; tar tzf "$OUT/results.tgz"; } >>"$log" 2>&1
# The full-OneNIP model of seed 133 (~48 MB; the bundle allows 64 MiB) comes back too: on the CPU,
# benchmarks/cpu_speed.py --model measures the runtimes' agreement on a properly trained model with it.
model=$(find "$res" -path '*/row5-seed133/*' -name model.safetensors 2>/dev/null | head -n 1)
[[ -n $model ]] && cp "$model" "$OUT/model-row5-seed133.safetensors" && echo "model: $model" >>"$log"
model=$(find "$res" -path '*/line-row5-seed133/*' -name model.safetensors 2>/dev/null | head -n 1)
[[ -n $model ]] && cp "$model" "$OUT/model-line-row5-seed133.safetensors" && echo "model: $model" >>"$log"
