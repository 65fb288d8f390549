// The whole model's table: embedding, layers, final norm, head.
#include "params/model_table.h"

#include "absl/strings/match.h"
#include "core/status.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeEmbedding(const runtime::ModelConfig& c) {
  ParamTable t;
  TensorRow embed;
  embed.role = "embed_tokens";
  embed.name = c.checkpoint.weight_prefix + "embed_tokens.weight";
  embed.shape = {c.vocab_size, c.hidden_size};
  embed.cut = Cut::kVocab;
  t.tensors.push_back(std::move(embed));
  return t;
}

ParamTable DescribeHead(const runtime::ModelConfig& c) {
  ParamTable t = DescribeNorm("norm", c.checkpoint.weight_prefix + "norm.weight", c.hidden_size);
  if (c.tie_word_embeddings) {
    t.adapters.push_back({"lm_head", c.vocab_size, c.hidden_size, Cut::kVocab, 1, 0, Group::kUnembed});
    return t;
  }
  std::string head = c.checkpoint.lm_head;
  if (absl::EndsWith(head, ".weight")) head.resize(head.size() - 7);
  t.Append(DescribeLinear("lm_head", head, c.vocab_size, c.hidden_size, Cut::kVocab, Group::kUnembed));
  return t;
}

absl::StatusOr<ParamTable> DescribeModel(const runtime::ModelConfig& c) {
  LATHE_ASSIGN_OR_RETURN(DescribeLayersFn layers, FindDescription(c));
  ParamTable t = DescribeEmbedding(c);
  t.Append(layers(c, c.checkpoint.weight_prefix));
  t.Append(DescribeHead(c));
  return t;
}

}  // namespace lathe::params
