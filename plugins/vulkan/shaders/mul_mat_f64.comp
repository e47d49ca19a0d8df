#version 450
// MUL_MAT with double sums, for devices with shaderFloat64: see
// mul_mat.glsl.
#define ACC_F64 1
#include "mul_mat.glsl"
