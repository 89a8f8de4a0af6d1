// SPOT_CPU_CLONES: compiles a hot CPU loop twice, for AVX2 + FMA (x86-64-v3) and for the baseline
// ISA, and picks the clone at load time, so one wheel runs on any x86-64 and uses AVX2 where it can.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define SPOT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPOT_CPU_CLONES
#endif
