#!/usr/bin/env bash
# Issue 3 evidence: critique on 64 AdvBench prompts with a kill -9 and a resume, then one small
# run per strategy family on SmolLM2.
set -u
cd "$(dirname "$0")/.."
P=.venv/bin/prefalign
OUT=runs/generate-examples
rm -rf $OUT; mkdir -p $OUT
log() { echo "### $(date +%T) $*"; }
log critique-64 start
$P generate -s critique --prompts advbench --limit 64 --principle safety --max-new-tokens 64 --batch-size 16 -o $OUT/critique-advbench64.jsonl -q > $OUT/critique-1.log 2>&1 &
pid=$!
# kill -9 once the first batch is on disk
while [ "$(wc -l < $OUT/critique-advbench64.jsonl 2>/dev/null || echo 0)" -lt 1 ]; do sleep 2; kill -0 $pid 2>/dev/null || break; done
sleep 20
kill -9 $pid; wait $pid 2>/dev/null
log "killed with $(wc -l < $OUT/critique-advbench64.jsonl) lines"
/usr/bin/time -v $P generate -s critique --prompts advbench --limit 64 --principle safety --max-new-tokens 64 --batch-size 16 -o $OUT/critique-advbench64.jsonl -q > $OUT/critique-2.log 2>&1
log "resumed: $(wc -l < $OUT/critique-advbench64.jsonl) lines"
.venv/bin/python - <<'PY'
import json
rows=[json.loads(l) for l in open("runs/generate-examples/critique-advbench64.jsonl")]
keys=[(r["meta"]["gen_key"], tuple(r["meta"].get("gen_part",[0,1]))) for r in rows]
print("records", len(rows), "unique", len(set(keys)), "prompts", len({r["meta"]["gen_key"] for r in rows}))
PY
log popalign start
$P generate -s popalign --prompts donotanswer --limit 4 --max-new-tokens 64 -o $OUT/popalign.jsonl -q > $OUT/popalign.log 2>&1
log anchors start
$P generate -s anchors --prompts rho-refusal --limit 4 --k 4 --max-new-tokens 48 -o $OUT/anchors.jsonl -q > $OUT/anchors.log 2>&1
log sample-pairs start
printf 'params: {scorer: sentiment}\n' > $OUT/sample-pairs.yaml
$P generate -s sample-pairs -c $OUT/sample-pairs.yaml --prompts realtoxicity --limit 4 -n 4 --max-new-tokens 40 --temperature 1.0 -o $OUT/sample-pairs.jsonl -q > $OUT/sample-pairs.log 2>&1
log toxic-control start
# ADPO's three steps: label base samples and write the [TOXIC] SFT records, train the control
# model on them, then sample a toxic response per prompt with it (same base samples, read back).
printf 'params: {scorer: profanity, threshold: 0.3, work_dir: %s}\n' "$OUT/tc" > $OUT/toxic-control.yaml
$P generate -s toxic-sft-data -c $OUT/toxic-control.yaml --prompts realtoxicity --limit 6 -n 4 --max-new-tokens 40 --temperature 1.0 -o $OUT/toxic-sft.jsonl -q > $OUT/toxic-sft-data.log 2>&1
printf 'data: %s\nloss: sft\nlr: 2.0e-5\nschedule: constant\nbatch_size: 4\nmax_steps: 12\noutput_dir: %s\n' "$OUT/toxic-sft.jsonl" "$OUT/tc-sft" > $OUT/toxic-sft.yaml
$P train -c $OUT/toxic-sft.yaml > $OUT/toxic-sft.log 2>&1
$P generate -s toxic-control -c $OUT/toxic-control.yaml --toxic-model $OUT/tc-sft/model --prompts realtoxicity --limit 6 -n 4 --max-new-tokens 40 --temperature 1.0 -o $OUT/toxic-control.jsonl -q > $OUT/toxic-control.log 2>&1
log all done
