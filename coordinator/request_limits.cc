// Identifier bounds; every message quotes its input through QuoteForMessage.
#include "coordinator/request_limits.h"

#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/checkpoint_path.h"
#include "core/quote.h"

namespace lathe::coordinator {
namespace {

using runtime::QuoteForMessage;

bool IdChar(char c) { return absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '-'; }

}  // namespace

absl::Status ValidateRunId(absl::string_view run_id) {
  // Measured before it is copied: a run_id may be megabytes long.
  if (run_id.size() > 128) {
    return absl::InvalidArgumentError(absl::StrCat("run_id must be 1-128 bytes (got ", run_id.size(), ")"));
  }
  return runtime::ValidateRunName(std::string(run_id), "run_id");
}

absl::Status ValidateOpId(absl::string_view op_id) {
  if (op_id.empty() || op_id.size() > kMaxOpIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("op_id must be 1-", kMaxOpIdBytes, " bytes (got ", op_id.size(), ")"));
  }
  for (char c : op_id) {
    if (!IdChar(c) && c != '/' && c != ':') {
      return absl::InvalidArgumentError(
          absl::StrCat("op_id may hold only letters, digits, '.', '_', '-', ':' and '/', not ", QuoteForMessage(op_id)));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateBaseModel(absl::string_view name) {
  if (name.size() > kMaxBaseModelBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("base_model must be at most ", kMaxBaseModelBytes, " bytes (got ", name.size(), ")"));
  }
  for (char c : name) {
    if (!absl::ascii_isprint(c)) {
      return absl::InvalidArgumentError(
          absl::StrCat("base_model must be printable ASCII, not ", QuoteForMessage(name)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParsePageToken(absl::string_view token, int64_t total) {
  if (token.empty()) return 0;
  bool digits = token.size() <= kMaxPageTokenBytes;
  for (char c : token) digits = digits && absl::ascii_isdigit(c);
  if (!digits) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_token must be one a previous page returned, not ", QuoteForMessage(token)));
  }
  int64_t start = 0;
  for (char c : token) start = start * 10 + (c - '0');  // at most 10 digits: no overflow
  if (start > total) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_token ", start, " is past the last of the checkpoint's ", total, " files"));
  }
  return start;
}

absl::Status ValidateRelativeFileName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxRelativeFileNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("relative_file_name must be 1-", kMaxRelativeFileNameBytes,
                                                   " bytes (got ", name.size(), ")"));
  }
  for (char c : name) {
    if (absl::ascii_iscntrl(c)) {
      return absl::InvalidArgumentError(
          absl::StrCat("relative_file_name holds a control byte: ", QuoteForMessage(name)));
    }
  }
  for (absl::string_view part : absl::StrSplit(name, '/')) {
    if (part.empty() || part == "." || part == "..") {
      return absl::InvalidArgumentError(absl::StrCat(
          "relative_file_name must be a relative path without empty, '.' or '..' parts, not ",
          QuoteForMessage(name)));
    }
  }
  return absl::OkStatus();
}

}  // namespace lathe::coordinator
