// Status propagation macros and the invariant check used across lathe.
// Abseil 20220623 ships no RETURN_IF_ERROR / ASSIGN_OR_RETURN, so they live here.
#ifndef LATHE_CORE_STATUS_H_
#define LATHE_CORE_STATUS_H_

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LATHE_STATUS_CONCAT_INNER_(a, b) a##b
#define LATHE_STATUS_CONCAT_(a, b) LATHE_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` yields a non-OK status.
#define LATHE_RETURN_IF_ERROR(expr)                      \
  do {                                                   \
    ::absl::Status lathe_status_ = (expr);               \
    if (!lathe_status_.ok()) return lathe_status_;       \
  } while (0)

// `lhs = value of expr` when expr (a StatusOr) is OK, else returns its status.
#define LATHE_ASSIGN_OR_RETURN(lhs, expr) \
  LATHE_ASSIGN_OR_RETURN_IMPL_(LATHE_STATUS_CONCAT_(lathe_statusor_, __LINE__), lhs, expr)
#define LATHE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

// Aborts on a broken invariant. Never use it for input validation.
#define LATHE_CHECK(cond)                                                             \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: LATHE_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

#endif  // LATHE_CORE_STATUS_H_
