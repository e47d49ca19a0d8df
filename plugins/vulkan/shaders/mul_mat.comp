#version 450
// MUL_MAT with float sums: see mul_mat.glsl.
#include "mul_mat.glsl"
