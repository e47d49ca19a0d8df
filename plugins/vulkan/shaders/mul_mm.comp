#version 450
// Tiled MUL_MAT with float sums: see mul_mm.glsl.
#include "mul_mm.glsl"
