#version 450
// Tiled MUL_MAT with float sums and packed 8-bit dot products: see
// mul_mm.glsl.
#extension GL_EXT_spirv_intrinsics : require
#define DOT 1
#include "mul_mm.glsl"
