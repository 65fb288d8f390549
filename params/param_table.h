// The parameter table of a model: every tensor its checkpoint holds for the
// text model (Hugging Face name, full shape, how tensor and expert
// parallelism cut it) and every LoRA adapter lathe can attach (module name,
// shape, cut, target group). Torch-free: the runtime loads its tensors by
// these rows and `lathe plan` counts parameters from the same rows.
#ifndef LATHE_PARAMS_PARAM_TABLE_H_
#define LATHE_PARAMS_PARAM_TABLE_H_

#include <cstdint>
#include <string>
#include <vector>

namespace lathe::params {

// How a tensor is split over its tp (or, for experts, ep) group.
enum class Cut {
  kWhole,     // every rank holds all of it
  kRows,      // dim 0 in tp equal parts (column-parallel outputs, per-head vectors)
  kCols,      // dim 1 in tp equal parts (row-parallel inputs)
  kVocab,     // dim 0 in tp balanced parts (sizes differ by at most one: embedding, lm_head)
  kKvRows,    // dim 0 by KV head (`unit` rows each): equal parts, or one shared head per rank
              // when there are fewer heads than ranks
  kPartRows,  // dim 0 is `parts` stacked blocks, each in tp equal parts; a rank holds its part of each
  kExperts,   // dim 0 (experts) in ep equal parts
};

// The LoRA target group of an adapter (LoraSettings picks which train).
enum class Group { kNone, kAttn, kMlp, kUnembed };

// What the runtime keeps a tensor as.
enum class Storage {
  kWeight,  // the run's dtype; trained in full fine-tuning
  kFrozenFp32,  // fp32 whatever the dtype, never trained (a router's correction bias)
  kFrozen,      // the run's dtype, never trained, not even in full fine-tuning (a sparse-attention indexer)
};

struct TensorRow {
  std::string role;  // the block's name for it: "q_proj", "input_layernorm", "experts.gate_proj"
  std::string name;  // Hugging Face name; for experts the MoE prefix + ".experts.{e}.<proj>.weight"
  std::vector<int64_t> shape;  // full shape; experts: [experts, out, in]
  Cut cut = Cut::kWhole;
  int64_t unit = 1;                // kKvRows: rows per head
  std::vector<int64_t> parts;      // kPartRows: the blocks' row counts (sum = shape[0])
  std::vector<std::string> part_modules;  // kPartRows: each block's adapter module (AdapterRow::module)
  bool whole_in_full_finetune = false;  // held whole when trained in full (the fused in_proj_qkv)
  Storage storage = Storage::kWeight;

  int64_t numel() const;
};

// A LoRA adapter on a linear layer of [out, in] (experts: one per expert):
// A [r, in], B [out, r]. Rows-cut layers cut B by `cut`, Cols-cut ones A.
struct AdapterRow {
  std::string module;  // PEFT's module name ("model.layers.0.self_attn.q_proj")
  int64_t out = 0, in = 0;
  Cut cut = Cut::kWhole;  // that of the layer's weight (kRows, kCols, kVocab, kKvRows, kWhole, kExperts)
  int64_t unit = 1;       // kKvRows
  int64_t experts = 0;    // kExperts: adapters per expert, `experts` of them
  Group group = Group::kNone;
};

struct ParamTable {
  std::vector<TensorRow> tensors;
  std::vector<AdapterRow> adapters;

  void Append(ParamTable other);
  // The tensor of role `role`, nullptr when absent.
  const TensorRow* Find(const std::string& role) const;
};

// This rank's part of one dimension: [begin, begin + size) of dim `dim`
// (dim -1: the whole tensor); several ranges for kPartRows.
struct RankPart {
  int dim = -1;
  std::vector<std::pair<int64_t, int64_t>> ranges;  // (begin, size)
  int64_t size() const;
};

// Where a rank sits: its place in the tp and ep groups, and whether the run
// trains in full.
struct RankPlace {
  int tp = 1, tp_rank = 0;
  int ep = 1, ep_rank = 0;
  bool full_finetune = false;
};

// The part of `row` the rank at `place` holds (REQUIRES: the cut divides,
// as parallel::ValidateMesh checks).
RankPart PartOf(const TensorRow& row, const RankPlace& place);
// Elements of `row` the rank holds.
int64_t RankNumel(const TensorRow& row, const RankPlace& place);

// The rows of `cut` for a linear of `rows` outputs (or inputs, kCols) on
// `place`: begin and size along its dim.
std::pair<int64_t, int64_t> CutRange(Cut cut, int64_t extent, int64_t unit, const RankPlace& place);

// Adapter elements at LoRA rank `r` the rank holds: A and B, cut as the
// layer's weight (a rows-cut layer: A whole, B cut; cols-cut: A cut, B whole).
int64_t RankAdapterNumel(const AdapterRow& row, int64_t r, const RankPlace& place);

// Sums over the table at `place`: base parameters (trainable weights, and
// frozen ones in the run's dtype and in fp32 apart), and adapter parameters
// at rank r in the groups that train.
struct RankCount {
  double weights = 0;
  double frozen = 0;
  double frozen_fp32 = 0;
  double adapters = 0;
};
struct TrainGroups {
  bool attn = true, mlp = true, unembed = true;
};
RankCount CountRank(const ParamTable& table, const RankPlace& place, int64_t lora_rank,
                    TrainGroups groups = {});

}  // namespace lathe::params

#endif  // LATHE_PARAMS_PARAM_TABLE_H_
