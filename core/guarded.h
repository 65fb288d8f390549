// The exception boundary of an operation: whatever libtorch or the standard
// library throws inside becomes an absl::Status, so no exception leaves an
// operation (STYLE: errors are values).
#ifndef LATHE_CORE_GUARDED_H_
#define LATHE_CORE_GUARDED_H_

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace lathe::runtime {

// Runs `body` (returning absl::Status or absl::StatusOr<T>) and returns what
// it returns; an exception becomes ResourceExhausted (std::bad_alloc) or
// Internal naming `what` (c10::Error, any other exception). Never throws.
template <typename F>
auto Guarded(absl::string_view what, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(what, ": an unknown exception"));
  }
}

}  // namespace lathe::runtime

#endif  // LATHE_CORE_GUARDED_H_
