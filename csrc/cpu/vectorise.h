// Wider vectors for the CPU epilogues without building for one machine: on x86-64 with GCC the
// marked loops are compiled three times (baseline SSE2, AVX2+FMA, AVX-512) and the best one the
// running CPU supports is picked once at load time (function multiversioning, an ifunc).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BAYESVLM_EXT_VECTORISE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BAYESVLM_EXT_VECTORISE
#endif
