// Streaming probe (not part of the package): how fast can one decode-style row loop read cold int8 weights,
// with and without software prefetch, against a plain sum over the same bytes? Behind the prefetch choice in
// matmul.cpp (kernels/MATMUL.md, "Software prefetch: on Intel only").
//
//   g++ -O2 -fopenmp kernels/cpu/probes/stream_probe.cpp -o /tmp/stream_probe && OMP_NUM_THREADS=2 /tmp/stream_probe
//
// Three 245 MiB buffers (lm_head of bloomz-560m in int8) rotate so that every pass reads from DRAM; each variant
// is repeated 15 times interleaved with the others and the median is printed.
//   row       : the W8A8 VNNI row loop of matmul.cpp (x reloaded from L1), prefetch 0 / 1 / 2 / 4 KiB ahead
//   rowreg    : the same with x held in 16 registers (K = 1024)
//   row2      : two weight rows per x load (two streams per thread)
#include <immintrin.h>
#include <omp.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <chrono>
#include <algorithm>
#include <vector>
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
const int64_t K=1024;
int8_t x[4096] __attribute__((aligned(64)));
template<int PF, bool DEFER>
TGT void rows(const int8_t* W, int64_t n0, int64_t n1, int32_t* y){
  const __m512i flip=_mm512_set1_epi8((char)0x80);
  if (!DEFER) {
  for(int64_t n=n0;n<n1;n++){
    const int8_t* w=W+n*K;
    __m512i a[4]={_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512()};
    for(int64_t k=0;k<K;k+=256){
#pragma GCC unroll 4
      for(int u=0;u<4;u++){
        if(PF) _mm_prefetch((const char*)(w+k+64*u+PF),_MM_HINT_T0);
        __m512i wv=_mm512_xor_si512(_mm512_loadu_si512(w+k+64*u),flip);
        a[u]=_mm512_dpbusd_epi32(a[u],wv,_mm512_load_si512(x+k+64*u));
      }
    }
    y[n]=_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a[0],a[1]),_mm512_add_epi32(a[2],a[3])));
  }
  } else {
  // x held in 16 registers
  __m512i xr[16];
  for(int i=0;i<16;i++) xr[i]=_mm512_load_si512(x+64*i);
  for(int64_t n=n0;n<n1;n++){
    const int8_t* w=W+n*K;
    __m512i a[4]={_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512()};
#pragma GCC unroll 16
    for(int i=0;i<16;i++){
        if(PF) _mm_prefetch((const char*)(w+64*i+PF),_MM_HINT_T0);
        __m512i wv=_mm512_xor_si512(_mm512_loadu_si512(w+64*i),flip);
        a[i&3]=_mm512_dpbusd_epi32(a[i&3],wv,xr[i]);
    }
    y[n]=_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a[0],a[1]),_mm512_add_epi32(a[2],a[3])));
  }
  }
}
template<int PF>
TGT void rows2(const int8_t* W, int64_t n0, int64_t n1, int32_t* y){
  const __m512i flip=_mm512_set1_epi8((char)0x80);
  for(int64_t n=n0;n+1<n1;n+=2){
    const int8_t* w=W+n*K;
    __m512i a[4]={_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512()};
    for(int64_t k=0;k<K;k+=128){
#pragma GCC unroll 2
      for(int u=0;u<2;u++){
        if(PF) {_mm_prefetch((const char*)(w+k+64*u+PF),_MM_HINT_T0);_mm_prefetch((const char*)(w+K+k+64*u+PF),_MM_HINT_T0);}
        __m512i xv=_mm512_load_si512(x+k+64*u);
        a[u]=_mm512_dpbusd_epi32(a[u],_mm512_xor_si512(_mm512_loadu_si512(w+k+64*u),flip),xv);
        a[2+u]=_mm512_dpbusd_epi32(a[2+u],_mm512_xor_si512(_mm512_loadu_si512(w+K+k+64*u),flip),xv);
      }
    }
    y[n]=_mm512_reduce_add_epi32(_mm512_add_epi32(a[0],a[1]));
    y[n+1]=_mm512_reduce_add_epi32(_mm512_add_epi32(a[2],a[3]));
  }
}
TGT int64_t sum(const int8_t* W, int64_t b0, int64_t b1){
  __m512i a[4]={_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512(),_mm512_setzero_si512()};
  for(int64_t i=b0;i<b1;i+=256){
    for(int u=0;u<4;u++) a[u]=_mm512_add_epi32(a[u],_mm512_loadu_si512(W+i+64*u));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a[0],a[1]),_mm512_add_epi32(a[2],a[3])));
}
int main(int argc,char**argv){
  int64_t N=250880; int64_t NB=N*K; int nbuf=3;
  std::vector<int8_t*> bufs; for(int b=0;b<nbuf;b++){int8_t* p=(int8_t*)aligned_alloc(2<<20,NB); memset(p,b+1,NB); bufs.push_back(p);} 
  for(int i=0;i<4096;i++)x[i]=i%7-3;
  std::vector<int32_t> y(N);
  const char* names[]={"sum","row pf2k","row nopf","row pf4k","rowreg pf2k","rowreg nopf", "row pf1k","row2 nopf","row2 pf2k"};
  std::vector<std::vector<double>> T(9);
  for(int rep=0;rep<15;rep++) for(int v=0;v<9;v++){
    const int8_t* W=bufs[(rep*9+v)%nbuf];
    double t=now();
    #pragma omp parallel
    { int t_=omp_get_thread_num(),nt=omp_get_num_threads(); int64_t n0=N*t_/nt,n1=N*(t_+1)/nt;
      switch(v){case 0: y[t_]=sum(W,n0*K,n1*K);break; case 1: rows<2048,false>(W,n0,n1,y.data());break;
      case 2: rows<0,false>(W,n0,n1,y.data());break; case 3: rows<4096,false>(W,n0,n1,y.data());break;
      case 4: rows<2048,true>(W,n0,n1,y.data());break; case 5: rows<0,true>(W,n0,n1,y.data());break;
      case 6: rows<1024,false>(W,n0,n1,y.data());break; case 7: rows2<0>(W,n0,n1,y.data());break; case 8: rows2<2048>(W,n0,n1,y.data());break;}
    }
    T[v].push_back(now()-t);
  }
  for(int v=0;v<9;v++){ auto& t=T[v]; std::sort(t.begin()+0,t.end()); double m=t[t.size()/2]; printf("%-14s %7.2f ms %6.1f GB/s\n",names[v],m*1e3,NB/m/1e9);} 
}
