// Shared by the kernels in this folder (each is compiled on its own by memagents.cores.native,
// whose cache key hashes this header with the source that includes it).
#pragma once

#include <cmath>
#include <cstdint>

#define EXPORT extern "C" __attribute__((visibility("default")))

using i64 = int64_t;

// torch.nn.functional.softplus with its default threshold: x > 20 gives x.
template <typename T>
inline T softplus(T x) {
    return x > T(20) ? x : std::log1p(std::exp(x));
}

// torch.sigmoid: 1 / (1 + e^-x).
template <typename T>
inline T sigmoid(T x) {
    return T(1) / (T(1) + std::exp(-x));
}
