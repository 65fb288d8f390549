// Each block type's tensors and adapters, as its runtime block loads them.
#include "params/blocks.h"

#include <tuple>
#include <utility>

namespace lathe::params {
namespace {

TensorRow Row(std::string role, std::string name, std::vector<int64_t> shape, Cut cut = Cut::kWhole) {
  TensorRow r;
  r.role = std::move(role);
  r.name = std::move(name);
  r.shape = std::move(shape);
  r.cut = cut;
  return r;
}

// `table` with `prefix` before each role.
ParamTable Prefixed(const std::string& prefix, ParamTable table) {
  for (TensorRow& r : table.tensors) r.role = prefix + r.role;
  return table;
}

}  // namespace

ParamTable DescribeNorm(const std::string& role, const std::string& name, int64_t width) {
  ParamTable t;
  t.tensors.push_back(Row(role, name, {width}));
  return t;
}

ParamTable DescribeLinear(const std::string& role, const std::string& module, int64_t out, int64_t in, Cut cut,
                          Group group, int64_t unit) {
  ParamTable t;
  TensorRow w = Row(role, module + ".weight", {out, in}, cut);
  w.unit = unit;
  t.tensors.push_back(std::move(w));
  if (group != Group::kNone) t.adapters.push_back({module, out, in, cut, unit, 0, group});
  return t;
}

ParamTable DescribeGqa(const std::string& prefix, const GqaDims& g) {
  const std::string p = prefix + ".";
  const int64_t d = g.head_dim, h = g.hidden;
  const int64_t q_rows = g.heads * (g.output_gate ? 2 * d : d);
  const int64_t kv = g.kv_heads * d, q_dim = g.heads * d;
  ParamTable t = DescribeLinear("q_proj", p + "q_proj", q_rows, h, Cut::kRows, Group::kAttn);
  t.Append(DescribeLinear("k_proj", p + "k_proj", kv, h, Cut::kKvRows, Group::kAttn, d));
  t.Append(DescribeLinear("v_proj", p + "v_proj", kv, h, Cut::kKvRows, Group::kAttn, d));
  t.Append(DescribeLinear("o_proj", p + "o_proj", h, q_dim, Cut::kCols, Group::kAttn));
  if (g.qkv_bias) {
    t.tensors.push_back(Row("q_proj.bias", p + "q_proj.bias", {q_rows}, Cut::kRows));
    for (const char* proj : {"k_proj", "v_proj"}) {
      TensorRow b = Row(std::string(proj) + ".bias", p + proj + ".bias", {kv}, Cut::kKvRows);
      b.unit = d;
      t.tensors.push_back(std::move(b));
    }
  }
  if (g.o_bias) t.tensors.push_back(Row("o_proj.bias", p + "o_proj.bias", {h}));
  if (g.qk_norm) {
    t.tensors.push_back(Row("q_norm", p + "q_norm.weight", {d}));
    t.tensors.push_back(Row("k_norm", p + "k_norm.weight", {d}));
  }
  return t;
}

ParamTable DescribeLatentAttention(const std::string& prefix, int64_t h, int64_t heads,
                                   const runtime::LatentAttentionConfig& a) {
  const std::string p = prefix + ".";
  ParamTable t;
  // q_b and kv_b read the latents: never adapted (as peft's default targets).
  if (a.q_lora_rank > 0) {
    t.Append(DescribeLinear("q_a_proj", p + "q_a_proj", a.q_lora_rank, h, Cut::kWhole, Group::kAttn));
    t.tensors.push_back(Row("q_a_layernorm", p + "q_a_layernorm.weight", {a.q_lora_rank}));
    t.Append(DescribeLinear("q_b_proj", p + "q_b_proj", heads * a.qk_head_dim(), a.q_lora_rank, Cut::kRows,
                            Group::kNone));
  } else {
    t.Append(DescribeLinear("q_proj", p + "q_proj", heads * a.qk_head_dim(), h, Cut::kRows, Group::kAttn));
  }
  t.Append(DescribeLinear("kv_a_proj_with_mqa", p + "kv_a_proj_with_mqa", a.kv_lora_rank + a.qk_rope_head_dim, h,
                          Cut::kWhole, Group::kAttn));
  t.tensors.push_back(Row("kv_a_layernorm", p + "kv_a_layernorm.weight", {a.kv_lora_rank}));
  t.Append(DescribeLinear("kv_b_proj", p + "kv_b_proj", heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank,
                          Cut::kRows, Group::kNone));
  t.Append(DescribeLinear("o_proj", p + "o_proj", h, heads * a.v_head_dim, Cut::kCols, Group::kAttn));
  return t;
}

ParamTable DescribeGatedDeltaNet(const std::string& prefix, int64_t h, const runtime::LinearAttentionConfig& la) {
  const std::string p = prefix + ".";
  const int64_t kd = la.key_dim(), vd = la.value_dim(), conv = la.conv_dim();
  ParamTable t;
  // One fused tensor, adapted as three linears; trained whole in full fine-tuning.
  TensorRow qkv = Row("in_proj_qkv", p + "in_proj_qkv.weight", {conv, h}, Cut::kPartRows);
  TensorRow conv1d = Row("conv1d", p + "conv1d.weight", {conv, 1, la.conv_kernel_size}, Cut::kPartRows);
  for (TensorRow* r : {&qkv, &conv1d}) {
    r->parts = {kd, kd, vd};
    r->part_modules = {p + "in_proj_q", p + "in_proj_k", p + "in_proj_v"};
    r->whole_in_full_finetune = true;
    t.tensors.push_back(*r);
  }
  for (auto [name, out] : {std::pair{"in_proj_q", kd}, {"in_proj_k", kd}, {"in_proj_v", vd}}) {
    t.adapters.push_back({p + name, out, h, Cut::kRows, 1, 0, Group::kAttn});
  }
  t.Append(DescribeLinear("in_proj_z", p + "in_proj_z", vd, h, Cut::kRows, Group::kAttn));
  t.Append(DescribeLinear("in_proj_b", p + "in_proj_b", la.num_value_heads, h, Cut::kRows, Group::kAttn));
  t.Append(DescribeLinear("in_proj_a", p + "in_proj_a", la.num_value_heads, h, Cut::kRows, Group::kAttn));
  t.tensors.push_back(Row("dt_bias", p + "dt_bias", {la.num_value_heads}, Cut::kRows));
  t.tensors.push_back(Row("A_log", p + "A_log", {la.num_value_heads}, Cut::kRows));
  t.tensors.push_back(Row("norm", p + "norm.weight", {la.value_head_dim}));
  t.Append(DescribeLinear("out_proj", p + "out_proj", h, vd, Cut::kCols, Group::kAttn));
  return t;
}

ParamTable DescribeSparseIndexer(const std::string& prefix, int64_t hidden, int64_t q_lora_rank, int64_t heads,
                                 int64_t head_dim) {
  const std::string p = prefix + ".";
  ParamTable t;
  t.tensors.push_back(Row("wq_b", p + "wq_b.weight", {heads * head_dim, q_lora_rank}));
  t.tensors.push_back(Row("wk", p + "wk.weight", {head_dim, hidden}));
  t.tensors.push_back(Row("k_norm.weight", p + "k_norm.weight", {head_dim}));
  t.tensors.push_back(Row("k_norm.bias", p + "k_norm.bias", {head_dim}));
  t.tensors.push_back(Row("weights_proj", p + "weights_proj.weight", {heads, hidden}));
  for (TensorRow& r : t.tensors) r.storage = Storage::kFrozen;
  return t;
}

ParamTable DescribeSwiGlu(const std::string& prefix, int64_t hidden, int64_t inter) {
  const std::string p = prefix + ".";
  ParamTable t = DescribeLinear("gate_proj", p + "gate_proj", inter, hidden, Cut::kRows, Group::kMlp);
  t.Append(DescribeLinear("up_proj", p + "up_proj", inter, hidden, Cut::kRows, Group::kMlp));
  t.Append(DescribeLinear("down_proj", p + "down_proj", hidden, inter, Cut::kCols, Group::kMlp));
  return t;
}

ParamTable DescribeRouterAndExperts(const std::string& prefix, int64_t experts, int64_t hidden, int64_t inter) {
  ParamTable t;
  t.tensors.push_back(Row("gate", prefix + ".gate.weight", {experts, hidden}));
  for (auto [proj, out, in] : {std::tuple{"gate_proj", inter, hidden}, {"up_proj", inter, hidden},
                               {"down_proj", hidden, inter}}) {
    const std::string role = std::string("experts.") + proj;
    t.tensors.push_back(Row(role, prefix + ".experts.{e}." + proj + ".weight", {experts, out, in}, Cut::kExperts));
    t.adapters.push_back({prefix + ".experts.{e}." + proj, out, in, Cut::kExperts, 1, experts, Group::kMlp});
  }
  return t;
}

ParamTable DescribeRoutedExperts(const std::string& prefix, int64_t hidden, int64_t experts, int64_t inter,
                                 int64_t shared_inter) {
  ParamTable t = DescribeRouterAndExperts(prefix, experts, hidden, inter);
  if (shared_inter > 0) {
    t.Append(Prefixed("shared_expert.", DescribeSwiGlu(prefix + ".shared_expert", hidden, shared_inter)));
    t.Append(DescribeLinear("shared_expert_gate", prefix + ".shared_expert_gate", 1, hidden, Cut::kWhole,
                            Group::kMlp));
  }
  return t;
}

ParamTable DescribeSigmoidExperts(const std::string& prefix, int64_t hidden, int64_t experts, int64_t inter,
                                  int64_t shared_inter) {
  ParamTable t = DescribeRouterAndExperts(prefix, experts, hidden, inter);
  TensorRow bias = Row("gate.e_score_correction_bias", prefix + ".gate.e_score_correction_bias", {experts});
  bias.storage = Storage::kFrozenFp32;
  t.tensors.push_back(std::move(bias));
  if (shared_inter > 0) {
    t.Append(Prefixed("shared_experts.", DescribeSwiGlu(prefix + ".shared_experts", hidden, shared_inter)));
  }
  return t;
}

}  // namespace lathe::params
