// Azure Managed Redis (Microsoft.Cache/redisEnterprise) for chat_history_rs's write-back tier, its
// connection string in Key Vault, and the App Service settings that switch the app to it. The
// successor of redis.bicep's Azure Cache for Redis; docs/deployment.md says which to pick and how to
// move from one to the other without losing a dirty conversation.
//
//   az deployment group create -g <resource-group> -f examples/azure/managed-redis.bicep \
//     -p resourcePrefix=<prefix> keyVaultName=<vault> appServiceName=<web-app>
//
// Not compiled or deployed where it was written (no Bicep CLI, no network): run
// `az bicep build -f managed-redis.bicep` and a `what-if` deployment first. The API version is
// 2025-04-01 (GA, the Balanced/MemoryOptimized/ComputeOptimized SKUs); 2024-09-01-preview has the
// same properties.

targetScope = 'resourceGroup'

@description('Prefix of resource names, as in the Phase 1 deployment: the cache is <prefix>-amr.')
param resourcePrefix string

@description('Region of the cache.')
param location string = resourceGroup().location

@description('Balanced_B5 is about 6 GB; B0/B1/B3 are smaller, B10 and up larger (MemoryOptimized_M*, ComputeOptimized_X* trade memory for vCPUs).')
param skuName string = 'Balanced_B5'

@description('''OSSCluster (the default): clients see every shard and the cluster key layout is used
by itself (chat_history_rs asks the server). EnterpriseCluster: one endpoint in front of the
shards, which still refuses a script whose keys are in several slots, so the app needs
REDIS_CLUSTER=true (set below).''')
@allowed([
  'OSSCluster'
  'EnterpriseCluster'
])
param clusteringPolicy string = 'OSSCluster'

@description('Append-only-file persistence: with write-back, a dirty conversation exists only in Redis until it is flushed, and AOF every second keeps it across a node restart.')
param aofEnabled bool = true

@description('Disabled halves the cost and loses every dirty conversation when a node is lost: only for trying it out.')
@allowed([
  'Enabled'
  'Disabled'
])
param highAvailability string = 'Enabled'

@description('The existing Key Vault that holds the app\'s secrets; the App Service\'s identity can already read it.')
param keyVaultName string

@description('Name of the Key Vault secret that receives the Redis connection string.')
param secretName string = 'redis-connection-string'

@description('The existing App Service (web app) that runs the chat app.')
param appServiceName string

@description('''false: create the cache and its secret, and leave the app alone. A move from Azure Cache
for Redis deploys with false (and another secretName, since the app's Key Vault reference follows
the secret's latest value) while the old cache is drained, then again with true to switch
(docs/deployment.md, "From Azure Cache for Redis").''')
param updateAppSettings bool = true

@description('REDIS_ENABLED for the app: false is the rollback switch (docs/deployment.md, "Rollback").')
param redisEnabled bool = true

@description('REDIS_CACHE_TTL: seconds a clean conversation stays cached after its last use (dirty ones never expire).')
@minValue(1)
param cacheTtlSeconds int = 1800

resource keyVault 'Microsoft.KeyVault/vaults@2023-02-01' existing = {
  name: keyVaultName
}

resource appService 'Microsoft.Web/sites@2022-09-01' existing = {
  name: appServiceName
}

// ======================== Azure Managed Redis ========================
resource redisCluster 'Microsoft.Cache/redisEnterprise@2025-04-01' = {
  name: '${resourcePrefix}-amr'
  location: location
  sku: {
    // The Balanced/MemoryOptimized/ComputeOptimized SKUs take no capacity.
    name: skuName
  }
  properties: {
    minimumTlsVersion: '1.2'
    highAvailability: highAvailability
  }
}

// A Managed Redis cache has exactly one database, named 'default'.
resource redisDatabase 'Microsoft.Cache/redisEnterprise/databases@2025-04-01' = {
  parent: redisCluster
  name: 'default'
  properties: {
    // TLS only: the connection string below is rediss://.
    clientProtocol: 'Encrypted'
    port: 10000
    // Chosen at creation; changing it later means a new database (and the migration in
    // docs/deployment.md).
    clusteringPolicy: clusteringPolicy
    // NOT an AllKeys* policy. With write-back, a conversation saved in Redis and not yet flushed
    // ("dirty") exists nowhere else; chat_history_rs removes the TTL of a dirty key and gives it
    // back once PostgreSQL has the conversation, and volatile-* policies evict only keys with a
    // TTL: clean cached copies go, unsaved chats stay. `chat-history doctor` checks it per shard.
    evictionPolicy: 'VolatileLRU'
    persistence: {
      aofEnabled: aofEnabled
      aofFrequency: aofEnabled ? '1s' : null
      rdbEnabled: false
    }
    // The key in the connection string below; Entra ID tokens are not used by chat_history_rs.
    accessKeysAuthentication: 'Enabled'
    modules: []
  }
}

// ======================== Connection string in Key Vault ========================
// rediss://:<key>@<name>.<region>.redis.azure.net:10000/0. The key is base64 and may hold '/', '+'
// and '='; uriComponent() percent-encodes it, which chat_history_rs decodes. One host name is
// enough on OSSCluster too: chat_history_rs asks it for the other shards.
resource redisConnectionStringSecret 'Microsoft.KeyVault/vaults/secrets@2023-02-01' = {
  parent: keyVault
  name: secretName
  properties: {
    contentType: 'Redis URL (rediss://)'
    value: 'rediss://:${uriComponent(redisDatabase.listKeys().primaryKey)}@${redisCluster.properties.hostName}:${redisDatabase.properties.port}/0'
  }
}

// ======================== App Service settings ========================
// Merged into the existing settings (a sites/config 'appsettings' resource would replace them all),
// as redis.bicep does.
module appSettings 'appsettings-merge.bicep' = if (updateAppSettings) {
  name: '${resourcePrefix}-amr-appsettings'
  params: {
    appServiceName: appService.name
    currentAppSettings: list('${appService.id}/config/appsettings', '2022-09-01').properties
    newAppSettings: {
      REDIS_ENABLED: redisEnabled ? 'true' : 'false'
      // A Key Vault reference, resolved with the app's managed identity; no version, so a key
      // rotation is picked up at the next restart.
      REDIS_CONNECTION_STRING: '@Microsoft.KeyVault(SecretUri=${redisConnectionStringSecret.properties.secretUri})'
      REDIS_CACHE_TTL: string(cacheTtlSeconds)
      // OSSCluster: empty, so the library asks the server (CLUSTER INFO says it is a cluster).
      // EnterpriseCluster: the endpoint does not say so, but still wants each script in one slot.
      REDIS_CLUSTER: clusteringPolicy == 'EnterpriseCluster' ? 'true' : ''
    }
  }
}

@description('Host name of the cache: <name>.<region>.redis.azure.net.')
output redisHostName string = redisCluster.properties.hostName

@description('TLS port of the database (10000).')
output redisPort int = redisDatabase.properties.port

@description('The clustering policy, and so whether REDIS_CLUSTER=true was set.')
output redisClusteringPolicy string = clusteringPolicy

@description('The Key Vault secret holding the connection string (the URI, not the value).')
output redisConnectionStringSecretUri string = redisConnectionStringSecret.properties.secretUri
