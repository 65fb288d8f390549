// Per-rank parts and counts of a parameter table.
#include "params/param_table.h"

#include <utility>

namespace lathe::params {
namespace {

// Start of part i of `total` in `parts` balanced parts (parallel::PartBegin's rule).
int64_t Balanced(int64_t total, int parts, int i) { return total * i / parts; }

bool Trains(Group g, const TrainGroups& groups) {
  switch (g) {
    case Group::kAttn: return groups.attn;
    case Group::kMlp: return groups.mlp;
    case Group::kUnembed: return groups.unembed;
    case Group::kNone: return false;
  }
  return false;
}

}  // namespace

int64_t TensorRow::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void ParamTable::Append(ParamTable other) {
  for (TensorRow& t : other.tensors) tensors.push_back(std::move(t));
  for (AdapterRow& a : other.adapters) adapters.push_back(std::move(a));
}

const TensorRow* ParamTable::Find(const std::string& role) const {
  for (const TensorRow& t : tensors) {
    if (t.role == role) return &t;
  }
  return nullptr;
}

int64_t RankPart::size() const {
  int64_t n = 0;
  for (auto [begin, size] : ranges) n += size;
  return n;
}

std::pair<int64_t, int64_t> CutRange(Cut cut, int64_t extent, int64_t unit, const RankPlace& p) {
  switch (cut) {
    case Cut::kWhole: return {0, extent};
    case Cut::kRows:
    case Cut::kCols:
    case Cut::kPartRows: return {p.tp_rank * (extent / p.tp), extent / p.tp};
    case Cut::kVocab: {
      const int64_t begin = Balanced(extent, p.tp, p.tp_rank);
      return {begin, Balanced(extent, p.tp, p.tp_rank + 1) - begin};
    }
    case Cut::kKvRows: {
      const int64_t heads = extent / unit;
      if (heads < p.tp) return {(p.tp_rank / (p.tp / heads)) * unit, unit};  // one shared head per rank
      return {p.tp_rank * (heads / p.tp) * unit, heads / p.tp * unit};
    }
    case Cut::kExperts: return {p.ep_rank * (extent / p.ep), extent / p.ep};
  }
  return {0, extent};
}

RankPart PartOf(const TensorRow& row, const RankPlace& p) {
  RankPart part;
  if (row.cut == Cut::kWhole || (row.whole_in_full_finetune && p.full_finetune)) return part;
  part.dim = row.cut == Cut::kCols ? 1 : 0;
  if (row.cut == Cut::kPartRows) {
    int64_t offset = 0;
    for (int64_t block : row.parts) {
      auto [begin, size] = CutRange(Cut::kRows, block, 1, p);
      part.ranges.push_back({offset + begin, size});
      offset += block;
    }
    return part;
  }
  part.ranges.push_back(CutRange(row.cut, row.shape[part.dim], row.unit, p));
  return part;
}

int64_t RankNumel(const TensorRow& row, const RankPlace& p) {
  const RankPart part = PartOf(row, p);
  if (part.dim < 0) return row.numel();
  return row.numel() / row.shape[part.dim] * part.size();
}

int64_t RankAdapterNumel(const AdapterRow& a, int64_t r, const RankPlace& p) {
  if (a.cut == Cut::kExperts) {
    const int64_t local = CutRange(Cut::kExperts, a.experts, 1, p).second;
    return local * r * (a.in + a.out);
  }
  const int64_t in = a.cut == Cut::kCols ? CutRange(Cut::kCols, a.in, 1, p).second : a.in;
  const int64_t out = a.cut == Cut::kCols ? a.out : CutRange(a.cut, a.out, a.unit, p).second;
  return r * (in + out);
}

RankCount CountRank(const ParamTable& table, const RankPlace& place, int64_t lora_rank, TrainGroups groups) {
  RankCount c;
  for (const TensorRow& t : table.tensors) {
    double& sum = t.storage == Storage::kFrozenFp32 ? c.frozen_fp32
                  : t.storage == Storage::kFrozen   ? c.frozen
                                                    : c.weights;
    sum += double(RankNumel(t, place));
  }
  if (lora_rank <= 0) return c;
  for (const AdapterRow& a : table.adapters) {
    if (Trains(a.group, groups)) c.adapters += double(RankAdapterNumel(a, lora_rank, place));
  }
  return c;
}

}  // namespace lathe::params
