#version 450
// Tiled MUL_MAT with double sums: see mul_mm.glsl.
#define ACC_F64 1
#include "mul_mm.glsl"
