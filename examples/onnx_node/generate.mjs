// Greedy generation on a dsv4 ONNX export from Node.js: onnxruntime-node and the export's tokenizer.json.
//
//     node generate.mjs EXPORT_DIR "prompt text" [--max-new 32]
//     node generate.mjs EXPORT_DIR --ids 5,17,300 [--max-new 32]
//
// The same loop as examples/onnx_plain.py, driven by manifest.json alone: it names the graph's inputs and
// outputs and the state buffers (shape, dtype, fill, which grow with the capacity).  A step returns only the
// rows it wrote, which the loop writes into its buffers in place; before a step would overflow the
// capacity, the growing buffers are re-allocated larger, keeping the rows held.  The weights stay as the
// export stores them (FP8/FP4 codes are decoded inside the graph), so nothing here depends on them.
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import ort from "onnxruntime-node";
import { Tokenizer } from "@huggingface/tokenizers";

const FORMAT = "dsv4-onnx", VERSION = 3;
const read = (dir, file) => JSON.parse(fs.readFileSync(path.join(dir, file), "utf8"));
const fail = (msg) => { console.error(`error: ${msg}`); process.exit(1); };

// Zero (`fill`) buffers for capacity `cap`; with `old`, its rows kept (except each growing buffer's spill row).
function fresh(graph, cap, old) {
  const state = {};
  for (const e of graph.state) {
    const dims = e.shape.map((d) => (d === "batch" ? 1 : typeof d === "string" ? cap / e.grows + 1 : d));
    if (old && !e.grows) { state[e.name] = old[e.name]; continue; }
    const n = dims.reduce((a, b) => a * b, 1);
    const data = e.dtype === "int64" ? new BigInt64Array(n).fill(BigInt(e.fill)) : new Float32Array(n).fill(e.fill);
    if (old) {
      const prev = old[e.name], rows = prev.dims[1] - 1, row = n / dims[1];
      data.set(prev.data.subarray(0, rows * row));
    }
    state[e.name] = new ort.Tensor(e.dtype, data, dims);
  }
  return state;
}

// buf[b, index[b, i]] = rows[b, i]: the step's new rows, written in place.
function writeRows(buf, rows, index) {
  const [batch, m] = index.dims, row = rows.data.length / (batch * m), held = buf.dims[1];
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < m; i++) {
      const at = (b * held + Number(index.data[b * m + i])) * row;
      buf.data.set(rows.data.subarray((b * m + i) * row, (b * m + i + 1) * row), at);
    }
  }
}

export async function greedy(dir, promptIds, maxNew, eos) {
  const man = read(dir, "manifest.json");
  if (man.format !== FORMAT || man.version !== VERSION) {
    fail(`${dir} is a ${man.format} export of version ${man.version}; this example reads version ${VERSION} ` +
         `(re-export it with \`dsv4 export onnx CHECKPOINT_DIR NEW_DIR\`)`);
  }
  const g = man.graphs.main, mult = man.capacity.multiple;
  if (promptIds.length + maxNew > man.max_len) {
    fail(`prompt + ${maxNew} new tokens exceed the exported context of ${man.max_len}`);
  }
  const sess = await ort.InferenceSession.create(path.join(dir, g.file), { executionProviders: ["cpu"] });
  let cap = man.capacity.min, state = fresh(g, cap);
  let ids = promptIds;
  const out = [];
  for (let step = 0; step < maxNew; step++) {
    const need = Number(state.start.data.reduce((a, b) => (a > b ? a : b))) + ids.length;
    if (need > cap) {                                   // grow (capacity: a multiple of mult)
      cap = Math.max(2 * cap, Math.ceil(need / mult) * mult);
      state = fresh(g, cap, state);
    }
    const feeds = { [g.inputs.ids]: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]) };
    for (const e of g.state) feeds[e.input] = state[e.name];
    const res = await sess.run(feeds);
    for (const e of g.state) {
      if (e.output) state[e.name] = res[e.output];
      else writeRows(state[e.name], res[e.rows], res[e.index]);
    }
    const logits = res[g.outputs.logits], vocab = logits.dims[2];
    const last = logits.data.subarray((logits.dims[1] - 1) * vocab, logits.dims[1] * vocab);
    let best = 0;
    for (let v = 1; v < vocab; v++) if (last[v] > last[best]) best = v;
    out.push(best);
    if (best === eos) break;
    ids = [best];
  }
  return out;
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { ids: { type: "string" }, "max-new": { type: "string", default: "32" } },
  });
  const [dir, prompt = ""] = positionals;
  if (!dir) fail("usage: node generate.mjs EXPORT_DIR [\"prompt\" | --ids 5,17,300] [--max-new 32]");
  const cfg = read(dir, "config.json");
  const tokConfig = fs.existsSync(path.join(dir, "tokenizer_config.json")) ? read(dir, "tokenizer_config.json") : {};
  const tok = new Tokenizer(read(dir, "tokenizer.json"), tokConfig);
  const ids = values.ids ? values.ids.split(",").map(Number)
    : [cfg.bos_token_id, ...tok.encode(prompt, { add_special_tokens: false }).ids];
  const out = await greedy(dir, ids, Number(values["max-new"]), cfg.eos_token_id);
  console.log(`ids: ${out.join(",")}`);
  console.log(out.length ? tok.decode(out, { skip_special_tokens: true }) : "");
}

main();
