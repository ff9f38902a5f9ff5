// Error messages of the op's checks, built without std::ostream's numeric inserters.
//
// TORCH_CHECK(cond, "...", x) formats x through std::ostream (c10::str). On the H200 device's
// toolchain (its g++ in /opt/gcc, Python's -Wl,-Bsymbolic-functions) the extension bound those
// inserters (std::ostream::_M_insert<long> and the locale code under it) to copies inside itself,
// and every message with a number in it crashed the process with a segfault instead of raising
// (measured: the group-size, head-dim and divisibility checks on CUDA and CPU tensors, commit
// a8b683e, docs/PERF_NOTES.md). blossomrec::msg() appends numbers with std::to_string (header
// code, no locale) and strings as they are, and the BR_CHECK* macros hand TORCH_CHECK a finished
// std::string, which c10::str passes through untouched. The message is built only when the check
// fails (inside TORCH_CHECK's failure branch).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace blossomrec {
namespace detail {

inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, char x) { s += x; }
inline void append(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>,
                                       int> = 0>
inline void append(std::string& s, T x) {
  s += std::to_string(x);
}
inline void append(std::string& s, double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  s += buf;
}
inline void append(std::string& s, c10::ScalarType x) { s += c10::toString(x); }
inline void append(std::string& s, const c10::Device& x) { s += x.str(); }
inline void append(std::string& s, c10::IntArrayRef x) {
  s += '[';
  for (size_t i = 0; i < x.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(x[i]);
  }
  s += ']';
}

}  // namespace detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace blossomrec

#define BR_CHECK(cond, ...) TORCH_CHECK(cond, ::blossomrec::msg(__VA_ARGS__))
#define BR_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::blossomrec::msg(__VA_ARGS__))
#define BR_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::blossomrec::msg(__VA_ARGS__))
