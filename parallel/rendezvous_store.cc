// Options of a group formed through a rendezvous store.
#include "parallel/rendezvous_store.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"

namespace lathe::parallel {

absl::Status ValidateStoreGroupOptions(const StoreGroupOptions& o) {
  if (o.size < 1) return absl::InvalidArgumentError(absl::StrCat("group size ", o.size));
  if (o.rank < 0 || o.rank >= o.size) {
    return absl::InvalidArgumentError(absl::StrCat("group rank ", o.rank, " outside [0, ", o.size, ")"));
  }
  if (o.generation < 1) return absl::InvalidArgumentError(absl::StrCat("group generation ", o.generation));
  if (o.group.empty() || o.group.size() > 128 ||
      !std::all_of(o.group.begin(), o.group.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
      })) {
    return absl::InvalidArgumentError(absl::StrCat("group name \"", o.group, "\""));
  }
  if (o.connect_timeout <= absl::ZeroDuration()) return absl::InvalidArgumentError("group connect_timeout <= 0");
  return absl::OkStatus();
}

}  // namespace lathe::parallel
