// Invariant checks for programming errors: a failed check means the code is wrong, not that the
// world misbehaved, so it prints where and why and aborts. Anything that can fail at run time
// (network, files, peers, user input) returns a Status instead (base/status.h).
//
//   STRATA_CHECK(ptr != nullptr);
//   STRATA_CHECK_MSG(n % world == 0, "{} elements do not split over {} ranks", n, world);
//   STRATA_CHECK_EQ(a.size(), b.size());   // prints "a.size() == b.size() (3 vs 4)"
//
// Operands are evaluated exactly once and must be formattable with fmt (pointers print as
// addresses, enums without a formatter as their underlying value). Integers of different
// signedness compare by value (std::cmp_less and friends), so CHECK_LT(size_t, int) neither warns
// nor gives the wrong answer for negative values.
#pragma once

#include <concepts>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

namespace strata::internal {

// Prints "file:line: Check failed: <expr><detail>" to stderr and aborts. `detail` carries its own
// leading punctuation so each macro decides how the expression and the values read together.
[[noreturn]] void CheckFailed(const char* file, int line, const char* expr,
                              std::string_view detail);

template <class T>
concept CheckInteger = std::integral<T> && !std::same_as<T, bool> && !std::same_as<T, char> &&
                       !std::same_as<T, wchar_t> && !std::same_as<T, char8_t> &&
                       !std::same_as<T, char16_t> && !std::same_as<T, char32_t>;

// Each comparison is a type so one CheckOp template serves all six macros.
#define STRATA_INTERNAL_CHECK_CMP(Name, op, int_cmp)      \
  struct Name {                                           \
    template <class A, class B>                           \
    static constexpr bool Test(const A& a, const B& b) {  \
      if constexpr (CheckInteger<A> && CheckInteger<B>) { \
        return int_cmp(a, b);                             \
      } else {                                            \
        return a op b;                                    \
      }                                                   \
    }                                                     \
  };
STRATA_INTERNAL_CHECK_CMP(CheckEqOp, ==, std::cmp_equal)
STRATA_INTERNAL_CHECK_CMP(CheckNeOp, !=, std::cmp_not_equal)
STRATA_INTERNAL_CHECK_CMP(CheckLtOp, <, std::cmp_less)
STRATA_INTERNAL_CHECK_CMP(CheckLeOp, <=, std::cmp_less_equal)
STRATA_INTERNAL_CHECK_CMP(CheckGtOp, >, std::cmp_greater)
STRATA_INTERNAL_CHECK_CMP(CheckGeOp, >=, std::cmp_greater_equal)
#undef STRATA_INTERNAL_CHECK_CMP

// What fmt is given for one operand.
template <class T>
decltype(auto) CheckPrintable(const T& v) {
  if constexpr (std::is_null_pointer_v<T>) {
    return static_cast<const void*>(nullptr);
  } else if constexpr (std::is_pointer_v<T>) {
    // Also for char pointers: the check compared addresses, and the pointee may not be a string.
    return static_cast<const void*>(v);
  } else if constexpr (std::is_enum_v<T>) {
    if constexpr (fmt::is_formattable<T>::value && !std::is_convertible_v<T, int>) {
      return v;  // a scoped enum with its own formatter (StatusCode, DType)
    } else {
      return static_cast<std::underlying_type_t<T>>(v);
    }
  } else {
    return v;
  }
}

// Kept out of line and cold so the passing path of a check is a compare and a branch.
template <class A, class B>
[[gnu::cold, gnu::noinline]] std::string CheckOpDetail(const A& a, const B& b) {
  return fmt::format(" ({} vs {})", CheckPrintable(a), CheckPrintable(b));
}

// Returns the failure detail, or nullopt when the comparison holds. Taking the operands by
// reference inside one full-expression keeps temporaries alive until they are printed.
template <class Op, class A, class B>
std::optional<std::string> CheckOp(const A& a, const B& b) {
  if (Op::Test(a, b)) [[likely]] {
    return std::nullopt;
  }
  return CheckOpDetail(a, b);
}

}  // namespace strata::internal

#define STRATA_CHECK(cond)                                                            \
  do {                                                                                \
    if (!(cond)) [[unlikely]] {                                                       \
      ::strata::internal::CheckFailed(__FILE__, __LINE__, #cond, std::string_view()); \
    }                                                                                 \
  } while (0)

// STRATA_CHECK_MSG(cond, fmtstr, args...): the message is formatted only when the check fails.
#define STRATA_CHECK_MSG(cond, ...)                                       \
  do {                                                                    \
    if (!(cond)) [[unlikely]] {                                           \
      ::strata::internal::CheckFailed(__FILE__, __LINE__, #cond,          \
                                      ": " + ::fmt::format(__VA_ARGS__)); \
    }                                                                     \
  } while (0)

#define STRATA_INTERNAL_CHECK_OP(Op, op, a, b)                                                     \
  do {                                                                                             \
    if (auto strata_check_detail_ = ::strata::internal::CheckOp<::strata::internal::Op>((a), (b))) \
        [[unlikely]] {                                                                             \
      ::strata::internal::CheckFailed(__FILE__, __LINE__, #a " " #op " " #b,                       \
                                      *strata_check_detail_);                                      \
    }                                                                                              \
  } while (0)

#define STRATA_CHECK_EQ(a, b) STRATA_INTERNAL_CHECK_OP(CheckEqOp, ==, a, b)
#define STRATA_CHECK_NE(a, b) STRATA_INTERNAL_CHECK_OP(CheckNeOp, !=, a, b)
#define STRATA_CHECK_LT(a, b) STRATA_INTERNAL_CHECK_OP(CheckLtOp, <, a, b)
#define STRATA_CHECK_LE(a, b) STRATA_INTERNAL_CHECK_OP(CheckLeOp, <=, a, b)
#define STRATA_CHECK_GT(a, b) STRATA_INTERNAL_CHECK_OP(CheckGtOp, >, a, b)
#define STRATA_CHECK_GE(a, b) STRATA_INTERNAL_CHECK_OP(CheckGeOp, >=, a, b)
