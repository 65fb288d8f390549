// Device choice from the local rank and the devices the launcher shows.
#include "parallel/device.h"

#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace lathe::parallel {

absl::StatusOr<DeviceChoice> ChooseDevice(const RankInfo& rank, const EnvLookup& env, int detected) {
  DeviceChoice choice;
  const char* visible = env("CUDA_VISIBLE_DEVICES");
  std::string source = "detected";
  if (visible != nullptr) {
    std::string list(absl::StripAsciiWhitespace(visible));
    source = absl::StrCat("CUDA_VISIBLE_DEVICES=", list);
    // CUDA stops at the first invalid entry; "-1" and "NoDevFiles" hide every device.
    choice.visible = 0;
    if (!list.empty()) {
      for (absl::string_view entry : absl::StrSplit(list, ',')) {
        entry = absl::StripAsciiWhitespace(entry);
        int n = 0;
        if (entry.empty() || entry == "NoDevFiles" || (absl::SimpleAtoi(entry, &n) && n < 0)) break;
        ++choice.visible;
      }
    }
  } else {
    choice.visible = detected;
  }
  if (choice.visible == 0) {
    choice.why = absl::StrCat("no GPU visible (", source, "): CPU");
    return choice;
  }
  if (choice.visible == 1) {
    choice.index = 0;
    choice.why = absl::StrCat("one GPU visible (", source, "): device 0");
    return choice;
  }
  if (choice.visible < rank.local_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        rank.local_size, " ranks on this node share ", choice.visible, " visible GPUs (", source,
        "): start one rank per GPU, or show each rank one GPU"));
  }
  choice.index = rank.local_rank;
  choice.why = absl::StrCat(choice.visible, " GPUs visible (", source, "): device ", rank.local_rank,
                            " by local rank ", rank.local_rank, " of ", rank.local_size);
  return choice;
}

int CountNvidiaDevices() {
  int count = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev", ec)) {
    std::string name = entry.path().filename().string();
    int n = 0;
    if (absl::StartsWith(name, "nvidia") && absl::SimpleAtoi(name.substr(6), &n)) ++count;
  }
  return count;
}

}  // namespace lathe::parallel
