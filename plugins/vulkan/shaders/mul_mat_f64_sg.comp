#version 450
// MUL_MAT with double sums, reduced with subgroup operations: see
// mul_mat.glsl.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#define ACC_F64 1
#define SUBGROUPS 1
#include "mul_mat.glsl"
