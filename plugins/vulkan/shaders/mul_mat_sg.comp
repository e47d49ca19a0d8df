#version 450
// MUL_MAT with float sums, reduced with subgroup operations: see
// mul_mat.glsl.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#define SUBGROUPS 1
#include "mul_mat.glsl"
