#version 450
// Tiled MUL_MAT with float sums and, for F16 weights, f16 arithmetic: see
// mul_mm.glsl.
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#define FP16 1
#include "mul_mm.glsl"
