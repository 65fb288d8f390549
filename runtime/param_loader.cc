// ParamLoader: one description per tensor, from which its slice, adapter or
// training registration follow.
#include "runtime/param_loader.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "runtime/weight_source.h"

namespace lathe::runtime {
namespace {

// PEFT's default: A ~ kaiming_uniform(a=√5), i.e. U(±1/√fan_in); B = 0.
// Drawn at full size so every layout starts from the same adapter.
at::Tensor LoraA(std::vector<int64_t> shape, at::Generator& gen) {
  double bound = 1.0 / std::sqrt(static_cast<double>(shape.back()));
  return at::empty(shape, at::kFloat).uniform_(-bound, bound, gen);
}

at::Tensor LoraB(std::vector<int64_t> shape) { return at::zeros(shape, at::kFloat).requires_grad_(true); }

Slice SliceOf(const TpCut& cut) { return cut.dim < 0 ? Slice{} : Slice{cut.dim, cut.begin, cut.size}; }

}  // namespace

void FusedLinears::Fuse() {
  std::vector<at::Tensor> weights;
  for (LoraLinear* p : parts) weights.push_back(p->weight);
  weight = at::cat(weights, 0);
  Visit([](at::Tensor&) {});
}

void FusedLinears::Visit(const TensorVisitor& fn) {
  if (!weight.defined()) return;
  fn(weight);
  int64_t offset = 0;
  for (LoraLinear* p : parts) {
    const int64_t rows = p->weight.size(0);
    p->weight = weight.narrow(0, offset, rows);
    offset += rows;
  }
}

void VisitLinear(LoraLinear& l, const TensorVisitor& fn) {
  fn(l.weight);
  fn(l.lora_a);
  fn(l.lora_b);
  fn(l.bias);
}

ParamLoader::ParamLoader(const TensorSource& source, const LoraSettings& lora,
                         std::vector<TrainableParam>* trainable)
    : source_(source), lora_(lora), trainable_(trainable),
      gen_(at::make_generator<at::CPUGeneratorImpl>(lora.seed)) {}

bool ParamLoader::Trains(LoraGroup group) const {
  switch (group) {
    case LoraGroup::kAttn: return lora_.train_attn;
    case LoraGroup::kMlp: return lora_.train_mlp;
    case LoraGroup::kUnembed: return lora_.train_unembed;
    case LoraGroup::kNone: return false;
  }
  return false;
}

void ParamLoader::Register(const std::string& name, at::Tensor& t, TpCut cut, bool per_expert, int64_t full) {
  t.requires_grad_(true);
  TrainableParam p{name, t, per_expert, cut.sync, cut.dim, cut.dim < 0 ? 0 : cut.begin, full};
  if (t.scalar_type() != at::kFloat) {
    // A bf16 weight trains through its fp32 master (exact: bf16 widens losslessly).
    p.compute = t;
    p.tensor = t.detach().to(at::kFloat).requires_grad_(true);
  }
  trainable_->push_back(std::move(p));
}

absl::StatusOr<at::Tensor> ParamLoader::Tensor(const std::string& name, std::vector<int64_t> shape, TpCut cut) {
  const int64_t full = cut.dim < 0 ? 0 : shape[cut.dim];
  LATHE_ASSIGN_OR_RETURN(at::Tensor t, source_.Take(name, std::move(shape), SliceOf(cut)));
  if (full_finetune()) Register(name, t, cut, false, full);
  return t;
}

absl::StatusOr<at::Tensor> ParamLoader::Frozen(const std::string& name, std::vector<int64_t> shape, TpCut cut) {
  return source_.TakeFloat32(name, std::move(shape), SliceOf(cut));
}

absl::StatusOr<LoraLinear> ParamLoader::FrozenLinear(const std::string& module, int64_t out, int64_t in,
                                                     TpCut cut) {
  LoraLinear l;
  LATHE_ASSIGN_OR_RETURN(l.weight, source_.Take(module + ".weight", {out, in}, SliceOf(cut)));
  return l;
}

absl::StatusOr<LoraLinear> ParamLoader::Linear(const std::string& module, int64_t out, int64_t in, TpCut cut,
                                               LoraGroup group) {
  LATHE_ASSIGN_OR_RETURN(LoraLinear l, FrozenLinear(module, out, in, cut));
  if (full_finetune()) {
    Register(module + ".weight", l.weight, cut, false, cut.dim == 0 ? out : cut.dim == 1 ? in : 0);
  } else {
    AttachLora(l, module, out, in, cut, group);
  }
  return l;
}

absl::StatusOr<LoraLinear> ParamLoader::LinearPart(const std::string& fused, int64_t fused_out, int64_t in,
                                                   int64_t offset, const std::string& module, int64_t out, TpCut cut,
                                                   LoraGroup group) {
  LoraLinear l;
  const Slice rows{0, offset + (cut.dim == 0 ? cut.begin : 0), cut.dim == 0 ? cut.size : out};
  LATHE_ASSIGN_OR_RETURN(l.weight, source_.Take(fused + ".weight", {fused_out, in}, rows));
  AttachLora(l, module, out, in, cut, group);
  return l;
}

void ParamLoader::AttachLora(LoraLinear& layer, const std::string& module, int64_t out, int64_t in, TpCut cut,
                             LoraGroup group) {
  if (full_finetune() || !Trains(group)) return;
  const int64_t r = lora_.rank;
  const bool row = cut.dim == 1;
  layer.lora_a = LoraA({r, in}, gen_);
  if (row) layer.lora_a = layer.lora_a.narrow(1, cut.begin, cut.size).contiguous();
  layer.lora_a.requires_grad_(true);
  layer.lora_b = LoraB({layer.weight.size(0), r});
  layer.scale = lora_.scale();
  TrainableParam a{module + ".lora_A.weight", layer.lora_a};
  TrainableParam b{module + ".lora_B.weight", layer.lora_b};
  if (row) {
    a.sync = cut.sync, a.shard_dim = 1, a.shard_begin = cut.begin, a.full_size = in;
  } else if (cut.dim == 0) {
    b.sync = cut.sync, b.shard_dim = 0, b.shard_begin = cut.begin, b.full_size = out;
  } else {
    a.sync = b.sync = cut.sync;
  }
  trainable_->push_back(std::move(a));
  trainable_->push_back(std::move(b));
}

absl::StatusOr<ExpertBank> ParamLoader::Experts(const std::string& mlp, int64_t total, int64_t begin,
                                                int64_t count, int64_t inter, int64_t hidden) {
  LATHE_ASSIGN_OR_RETURN(auto taken, source_.TakeExperts(mlp, total, inter, hidden, begin, count));
  ExpertBank bank;
  bank.gate = taken.gate, bank.up = taken.up, bank.down = taken.down;
  const std::string prefix = mlp + ".experts.{e}.";
  const TpCut experts{0, begin, count, GradSync::kExpert};
  if (full_finetune()) {
    for (auto [proj, t] : {std::pair{"gate_proj", &bank.gate}, {"up_proj", &bank.up}, {"down_proj", &bank.down}}) {
      Register(absl::StrCat(prefix, proj, ".weight"), *t, experts, true, total);
    }
    return bank;
  }
  if (!Trains(LoraGroup::kMlp)) return bank;
  const int64_t r = lora_.rank;
  bank.scale = lora_.scale();
  auto add = [&](at::Tensor& a, at::Tensor& b, const char* proj, int64_t in, int64_t out) {
    a = LoraA({total, r, in}, gen_).narrow(0, begin, count).contiguous().requires_grad_(true);
    b = LoraB({count, out, r});
    for (auto [t, kind] : {std::pair{&a, "lora_A"}, {&b, "lora_B"}}) {
      trainable_->push_back({absl::StrCat(prefix, proj, ".", kind, ".weight"), *t, true, GradSync::kExpert, 0,
                             begin, total});
    }
  };
  add(bank.gate_a, bank.gate_b, "gate_proj", hidden, inter);
  add(bank.up_a, bank.up_b, "up_proj", hidden, inter);
  add(bank.down_a, bank.down_b, "down_proj", inter, hidden);
  return bank;
}

namespace {

std::string ModuleOf(const std::string& weight) {
  return absl::EndsWith(weight, ".weight") ? weight.substr(0, weight.size() - 7) : weight;
}

LoraGroup LoraGroupOf(params::Group g) {
  switch (g) {
    case params::Group::kAttn: return LoraGroup::kAttn;
    case params::Group::kMlp: return LoraGroup::kMlp;
    case params::Group::kUnembed: return LoraGroup::kUnembed;
    case params::Group::kNone: return LoraGroup::kNone;
  }
  return LoraGroup::kNone;
}

}  // namespace

DescribedLoader::DescribedLoader(ParamLoader& loader, params::ParamTable rows, const ModelShard& shard)
    : loader_(loader), rows_(std::move(rows)) {
  place_ = {shard.tp.size(), shard.tp.rank(), shard.ep.size(), shard.ep.rank(), loader.full_finetune()};
}

absl::StatusOr<const params::TensorRow*> DescribedLoader::Row(const std::string& role) const {
  const params::TensorRow* row = rows_.Find(role);
  if (row == nullptr) return absl::InternalError(absl::StrCat("the block's description has no '", role, "'"));
  return row;
}

TpCut DescribedLoader::CutOf(const params::TensorRow& row, GradSync whole) const {
  const params::RankPart part = params::PartOf(row, place_);
  if (part.dim < 0) return TpCut::Whole(whole);
  const auto [begin, size] = part.ranges.front();
  if (part.dim == 1) return TpCut::Cols(begin, size);
  const bool shared = row.cut == params::Cut::kKvRows && row.shape[0] / row.unit < place_.tp;
  return TpCut::Rows(begin, size, shared);
}

LoraGroup DescribedLoader::GroupOf(const std::string& module) const {
  for (const params::AdapterRow& a : rows_.adapters) {
    if (a.module == module) return LoraGroupOf(a.group);
  }
  return LoraGroup::kNone;
}

absl::StatusOr<at::Tensor> DescribedLoader::Tensor(const std::string& role, GradSync whole) {
  LATHE_ASSIGN_OR_RETURN(const params::TensorRow* row, Row(role));
  return loader_.Tensor(row->name, row->shape, CutOf(*row, whole));
}

absl::StatusOr<at::Tensor> DescribedLoader::TensorPart(const std::string& role, int part) {
  LATHE_ASSIGN_OR_RETURN(const params::TensorRow* row, Row(role));
  const params::RankPart p = params::PartOf(*row, place_);
  const auto [begin, size] = p.ranges.at(part);
  return loader_.Tensor(row->name, row->shape, TpCut::Rows(begin, size));
}

absl::StatusOr<at::Tensor> DescribedLoader::Frozen(const std::string& role) {
  LATHE_ASSIGN_OR_RETURN(const params::TensorRow* row, Row(role));
  return loader_.Frozen(row->name, row->shape, CutOf(*row));
}

absl::StatusOr<at::Tensor> DescribedLoader::FrozenWeight(const std::string& role) {
  LATHE_ASSIGN_OR_RETURN(const params::TensorRow* row, Row(role));
  LATHE_CHECK(row->storage == params::Storage::kFrozen && row->shape.size() == 2);
  LATHE_ASSIGN_OR_RETURN(LoraLinear l, loader_.FrozenLinear(ModuleOf(row->name), row->shape[0], row->shape[1],
                                                            CutOf(*row)));
  return l.weight;
}

absl::StatusOr<LoraLinear> DescribedLoader::Linear(const std::string& role, GradSync whole) {
  LATHE_ASSIGN_OR_RETURN(const params::TensorRow* row, Row(role));
  const std::string module = ModuleOf(row->name);
  return loader_.Linear(module, row->shape[0], row->shape[1], CutOf(*row, whole), GroupOf(module));
}

absl::StatusOr<LoraLinear> DescribedLoader::LinearPart(const std::string& role, int part) {
  LATHE_ASSIGN_OR_RETURN(const params::TensorRow* row, Row(role));
  int64_t offset = 0;
  for (int i = 0; i < part; ++i) offset += row->parts.at(i);
  const int64_t out = row->parts.at(part);
  const auto [begin, size] = params::CutRange(params::Cut::kRows, out, 1, place_);
  const std::string& module = row->part_modules.at(part);
  return loader_.LinearPart(ModuleOf(row->name), row->shape[0], row->shape[1], offset, module, out,
                            TpCut::Rows(begin, size), GroupOf(module));
}

absl::StatusOr<ExpertBank> DescribedLoader::Experts() {
  LATHE_ASSIGN_OR_RETURN(const params::TensorRow* gate, Row("experts.gate_proj"));
  const int64_t total = gate->shape[0], inter = gate->shape[1], hidden = gate->shape[2];
  const auto [begin, count] = params::CutRange(params::Cut::kExperts, total, 1, place_);
  const std::string mlp = gate->name.substr(0, gate->name.find(".experts.{e}."));
  return loader_.Experts(mlp, total, begin, count, inter, hidden);
}

}  // namespace lathe::runtime
