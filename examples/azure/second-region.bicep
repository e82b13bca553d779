// A second region for the chat app (docs/deployment.md, "Multi-region"): its own App Service and its own
// Azure Managed Redis (managed-redis.bicep), over the one PostgreSQL primary, with a geo read replica of
// that primary in the second region for disaster recovery, and Azure Front Door routing each user to the
// nearer healthy region. The caches are separate (no active geo-replication): each follows PostgreSQL's
// change feed by itself (docs/design.md, section 17), so nothing here configures the library beyond the
// first region's settings with the second region's Redis.
//
//   az deployment group create -g <resource-group> -f examples/azure/second-region.bicep \
//     -p resourcePrefix=<prefix> secondLocation=<region> firstAppServiceName=<web-app> \
//        keyVaultName=<vault> postgresServerName=<flexible-server>
//
// Not compiled or deployed where it was written (no Bicep CLI, no network): run
// `az bicep build -f second-region.bicep` and a `what-if` deployment first. Point both regions'
// DATABASE_URL at the server's writer virtual endpoint, so a promotion of the replica needs no app change.

targetScope = 'resourceGroup'

@description('Prefix of resource names, as in the first region: this region\'s resources are <prefix>-r2-*.')
param resourcePrefix string

@description('The second region (e.g. westeurope when the first is eastus).')
param secondLocation string

@description('The first region\'s App Service: its plan\'s SKU, its runtime and its app settings are copied.')
param firstAppServiceName string

@description('The existing Key Vault holding the app\'s secrets (the second app\'s identity is given read access).')
param keyVaultName string

@description('The PostgreSQL flexible server primary (first region).')
param postgresServerName string

@description('SKU of the replica; Azure requires the primary\'s tier and at least its size.')
param replicaSkuName string = 'Standard_D2ds_v5'
param replicaSkuTier string = 'GeneralPurpose'

@description('Path Front Door probes on each region (the app answers it without a database round trip).')
param healthProbePath string = '/'

var secondName = '${resourcePrefix}-r2'

resource firstApp 'Microsoft.Web/sites@2022-09-01' existing = {
  name: firstAppServiceName
}

resource firstPlan 'Microsoft.Web/serverfarms@2022-09-01' existing = {
  name: last(split(firstApp.properties.serverFarmId, '/'))
}

resource keyVault 'Microsoft.KeyVault/vaults@2023-02-01' existing = {
  name: keyVaultName
}

resource primary 'Microsoft.DBforPostgreSQL/flexibleServers@2024-08-01' existing = {
  name: postgresServerName
}

// ======================== App Service ========================
resource secondPlan 'Microsoft.Web/serverfarms@2022-09-01' = {
  name: '${secondName}-plan'
  location: secondLocation
  sku: firstPlan.sku
  kind: firstPlan.kind
  properties: {
    reserved: firstPlan.properties.reserved
  }
}

resource secondApp 'Microsoft.Web/sites@2022-09-01' = {
  name: '${secondName}-app'
  location: secondLocation
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    serverFarmId: secondPlan.id
    httpsOnly: true
    siteConfig: {
      linuxFxVersion: firstApp.properties.siteConfig.linuxFxVersion
      appCommandLine: firstApp.properties.siteConfig.appCommandLine
      minTlsVersion: '1.2'
      // Everything the first region's app has (DATABASE_URL, the chat app's keys, REDIS_*); this
      // region's Redis replaces REDIS_CONNECTION_STRING below. Key Vault references stay references.
      appSettings: [for setting in items(list('${firstApp.id}/config/appsettings', '2022-09-01').properties): {
        name: setting.key
        value: setting.value
      }]
    }
  }
}

// Key Vault Secrets User, so the app's Key Vault references resolve (a vault with RBAC authorization;
// with access policies, add a `get` policy for secondApp.identity.principalId instead).
resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(keyVault.id, secondApp.id, 'Key Vault Secrets User')
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')
    principalId: secondApp.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// ======================== Redis of this region ========================
// Its own cache and its own secret; the module merges REDIS_ENABLED, REDIS_CONNECTION_STRING (a Key
// Vault reference to this region's secret) and REDIS_CLUSTER into the second app's settings.
module secondRedis 'managed-redis.bicep' = {
  name: '${secondName}-redis'
  dependsOn: [
    secretsUser
  ]
  params: {
    resourcePrefix: secondName
    location: secondLocation
    keyVaultName: keyVaultName
    secretName: 'redis-connection-string-r2'
    appServiceName: secondApp.name
  }
}

// ======================== PostgreSQL geo read replica ========================
// Disaster recovery only: the library reads and writes the primary (a replica's lag would serve older
// copies on misses). Promote it when the first region is lost, then delete each region's feed mark
// (docs/deployment.md, "Multi-region").
resource replica 'Microsoft.DBforPostgreSQL/flexibleServers@2024-08-01' = {
  name: '${postgresServerName}-r2'
  location: secondLocation
  sku: {
    name: replicaSkuName
    tier: replicaSkuTier
  }
  properties: {
    createMode: 'Replica'
    sourceServerResourceId: primary.id
  }
}

// ======================== Front Door ========================
resource frontDoor 'Microsoft.Cdn/profiles@2024-02-01' = {
  name: '${resourcePrefix}-fd'
  location: 'global'
  sku: {
    name: 'Standard_AzureFrontDoor'
  }
}

resource endpoint 'Microsoft.Cdn/profiles/afdEndpoints@2024-02-01' = {
  parent: frontDoor
  name: '${resourcePrefix}-chat'
  location: 'global'
  properties: {
    enabledState: 'Enabled'
  }
}

resource originGroup 'Microsoft.Cdn/profiles/originGroups@2024-02-01' = {
  parent: frontDoor
  name: 'regions'
  properties: {
    // Latency-based: each user goes to the nearer healthy region. No session affinity is needed: a user
    // moved to the other region reads what the first wrote back within the flush interval plus the
    // feed's poll.
    loadBalancingSettings: {
      sampleSize: 4
      successfulSamplesRequired: 3
      additionalLatencyInMilliseconds: 50
    }
    healthProbeSettings: {
      probePath: healthProbePath
      probeRequestType: 'HEAD'
      probeProtocol: 'Https'
      probeIntervalInSeconds: 30
    }
    sessionAffinityState: 'Disabled'
  }
}

resource firstOrigin 'Microsoft.Cdn/profiles/originGroups/origins@2024-02-01' = {
  parent: originGroup
  name: 'region1'
  properties: {
    hostName: firstApp.properties.defaultHostName
    originHostHeader: firstApp.properties.defaultHostName
    httpsPort: 443
    priority: 1
    weight: 1000
  }
}

resource secondOrigin 'Microsoft.Cdn/profiles/originGroups/origins@2024-02-01' = {
  parent: originGroup
  name: 'region2'
  properties: {
    hostName: secondApp.properties.defaultHostName
    originHostHeader: secondApp.properties.defaultHostName
    httpsPort: 443
    priority: 1
    weight: 1000
  }
}

resource route 'Microsoft.Cdn/profiles/afdEndpoints/routes@2024-02-01' = {
  parent: endpoint
  name: 'app'
  dependsOn: [
    firstOrigin
    secondOrigin
  ]
  properties: {
    originGroup: {
      id: originGroup.id
    }
    supportedProtocols: [
      'Https'
    ]
    httpsRedirect: 'Enabled'
    forwardingProtocol: 'HttpsOnly'
    patternsToMatch: [
      '/*'
    ]
    linkToDefaultDomain: 'Enabled'
  }
}

@description('The address users reach: Front Door\'s endpoint (add a custom domain to it).')
output frontDoorHostName string = endpoint.properties.hostName

@description('The second region\'s web app.')
output secondAppHostName string = secondApp.properties.defaultHostName

@description('The replica to promote when the first region is lost.')
output replicaServerName string = replica.name
